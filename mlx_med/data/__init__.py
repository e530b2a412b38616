"""Readers, PT packing, SFT masks and batches: files in, token batches out."""
