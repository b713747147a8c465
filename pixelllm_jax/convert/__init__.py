"""Importers of public pretrained weights (Hugging Face / torch / T5X) into this project's params.

`common` holds the shared pieces (state-dict loading, the key-accounting `ConversionReport`);
one module per tower maps its source names onto ours (`t5`, ...).
"""
