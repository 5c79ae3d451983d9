"""The compression pipeline: a short loop over the blocks of a decoder (`loop`), with its parts each in a module of
its own: the run's state (`state`), the first block's inputs (`capture`), one block's layers compressed as their
inputs complete (`blockrun`), a layer's or a group's solve (`layers`), several ranks (`sharing`), checkpoints
(`checkpoint`), the plan (`plan`), the lm_head (`lm_head`) and the report (`report`)."""
from .loop import compress_model
from .state import RunState, auto_batch_size, resolve_device

__all__ = ["RunState", "auto_batch_size", "compress_model", "resolve_device"]
