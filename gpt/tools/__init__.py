"""Tools around a trained run: whole-split evaluation, attention maps, loss plots."""
