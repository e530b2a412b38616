"""Adapters: directory format, the adapter mix (α), LoRA layers, merge, fuse, live α, PEFT I/O."""
