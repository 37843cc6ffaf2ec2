"""GGUF files as llama.cpp itself writes them, for the llm family's llama.cpp cases.

:func:`convert` runs llama.cpp's own ``convert_hf_to_gguf.py`` on Hugging Face
folders written by ``save_pretrained`` (in a child process, so the source tree's
``gguf-py`` never shadows the installed ``gguf`` package in the evaluation), and
:func:`quantize` runs a ``llama-quantize`` binary built from the same tree.

The tiny models have no tokenizer, so the converter's ``LlamaModel.set_vocab`` is
skipped, as tests/fixtures/make_llama_gguf.py does; everything the converter does to
the weights (renames, the q/k ``permute``, the outtype) still runs, and
``llama-quantize`` reads no vocabulary.

    python benchmarks/llama_cpp_gguf.py LLAMA_CPP HF_DIR OUTFILE OUTTYPE [HF_DIR OUTFILE OUTTYPE ...]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def convert(llama_cpp: Path, jobs: list[tuple[Path, Path, str]]) -> None:
    """Convert every (Hugging Face folder, GGUF file, outtype) job, in one child process."""
    args = [str(x) for job in jobs for x in job]
    r = subprocess.run([sys.executable, __file__, str(llama_cpp), *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")


def quantize(binary: Path, src: Path, dst: Path, qtype: str) -> Path:
    """``llama-quantize src dst qtype``; returns ``dst``."""
    r = subprocess.run([str(binary), str(src), str(dst), qtype], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama-quantize {qtype} failed:\n{r.stderr[-3000:]}")
    return dst


def _main(argv: list[str]) -> None:
    llama_cpp = Path(argv[0])
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    sys.path.insert(0, str(llama_cpp))
    import convert_hf_to_gguf  # type: ignore[import-not-found]
    from conversion.llama import LlamaModel  # type: ignore[import-not-found]

    LlamaModel.set_vocab = lambda self: None
    rest = argv[1:]
    for i in range(0, len(rest), 3):
        hf, out, outtype = rest[i : i + 3]
        sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", out, "--outtype", outtype]
        convert_hf_to_gguf.main()


if __name__ == "__main__":
    _main(sys.argv[1:])
