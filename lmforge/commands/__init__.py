"""Thin CLI wirings that join packages the layering keeps apart (e.g. data readers → tokenizer training)."""
