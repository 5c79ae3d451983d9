"""``optimum-cli sparsegpt {compress,eval,export,run} ...``: the sparsegpt-export commands inside optimum-cli.

Installed as ``optimum/commands/register/sparsegpt_export.py`` (the PEP 420 namespace optimum-cli scans at
start-up). It imports nothing heavy: each command takes its arguments verbatim and hands them to
``sparsegpt_export.cli.main`` when it runs; ``--help`` prints that command's own help. The model or folder
comes first, as in ``optimum-cli sparsegpt compress smollm2-135m --pattern 2:4 --out OUT``.
"""
import argparse

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


def _own_help(parser: argparse.ArgumentParser, command: str) -> None:
    def print_help(file=None):
        from sparsegpt_export.cli import build_parser

        sub = build_parser().subparsers_by_name[command]
        sub.prog = parser.prog
        sub.print_help(file)

    parser.print_help = print_help


class _Delegate(BaseOptimumCLICommand):
    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("args", nargs=argparse.REMAINDER, help="the arguments of `sparsegpt-export <command>`")
        _own_help(parser, parser.prog.split()[-1])

    def run(self) -> None:
        from sparsegpt_export.cli import main

        raise SystemExit(main([self.COMMAND.name, *self.args.args]))


class SparseGPTCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="sparsegpt", help="SparseGPT pruning + 4-bit quantization and its exports (sparsegpt-export)")
    SUBCOMMANDS = (
        CommandInfo(name="compress", help="prune (2:4, 4:8, N:M, unstructured) and quantize a causal LM one-shot",
                    subcommand_class=_Delegate),
        CommandInfo(name="export", help="convert a compress output to sparse24, compressed-tensors, dense or onnx",
                    subcommand_class=_Delegate),
        CommandInfo(name="eval", help="perplexity of a checkpoint (the paper's protocol)", subcommand_class=_Delegate),
        CommandInfo(name="run", help="generate text with an ONNX export (ONNX Runtime)", subcommand_class=_Delegate),
    )


REGISTER_COMMANDS = [SparseGPTCommand]
