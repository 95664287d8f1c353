"""Runs llama.cpp's ``convert_hf_to_gguf.py`` on a checkpoint, as a script in its own process (the
converter's imports and logging stay out of the bench's):

    python llamacpp_convert.py LLAMA_CPP_SOURCE CHECKPOINT OUT.gguf OUTTYPE

The GGUF gets llama.cpp's "none" vocabulary (``vocab_size`` dummy tokens) instead of the checkpoint's
tokenizer: the benchmark checkpoints' tokenizer is word-level, which the converter cannot take (it wants
sentencepiece or a BPE it knows by hash), and ``llama-batched-bench`` feeds random token ids, never text.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def _no_vocab(self) -> None:
    writer = self.gguf_writer
    writer.add_tokenizer_model("none")
    # llama.cpp sizes a "none" vocabulary by this key; some architectures' converters write it already
    if f"{writer.arch}.vocab_size" not in writer.kv_data[0]:
        writer.add_vocab_size(self.hparams["vocab_size"])


def main(argv: list[str]) -> None:
    source, checkpoint, out, outtype = argv
    # Run as a script, this folder is sys.path[0], and its kernels.py would shadow the `kernels`
    # package that transformers looks for.
    here = Path(__file__).resolve().parent
    sys.path[:] = [source, str(Path(source) / "gguf-py"), *(p for p in sys.path if Path(p or ".").resolve() != here)]
    import conversion

    find = conversion.get_model_class

    def get_model_class(*args, **kwargs):
        cls = find(*args, **kwargs)
        cls.set_vocab = _no_vocab
        return cls

    conversion.get_model_class = get_model_class  # the script imports it from the package at its start
    sys.argv = ["convert_hf_to_gguf.py", checkpoint, "--outtype", outtype, "--outfile", out]
    runpy.run_path(str(Path(source) / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
