"""Converters: one module per serving format, each behind one ``export(src, out, **options)`` function."""
