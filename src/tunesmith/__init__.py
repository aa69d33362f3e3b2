"""tunesmith: fine-tune pretrained language models end to end.

Pipeline, one package each: data -> models -> methods -> train -> evaluate -> export, plus cli.
"""
__version__ = "0.1.0"
