"""llama.cpp's ``convert_hf_to_gguf.py``, run with a few tokenizer keys codetune knows and the converter cannot guess.

A script, not a module of codetune: :mod:`codetune.exports.gguf` runs it in a subprocess with the interpreter
in use, so the converter's imports (its own ``gguf-py`` first, then ``conversion/``) never mix with codetune's.

    python llama_cpp_converter.py LLAMA_CPP_DIR KEYS_JSON -- <convert_hf_to_gguf.py arguments>

``KEYS_JSON`` holds ``{"keys": {gguf_key: [kind, value]}, "fallback_pre": name | null}``. The keys (FIM token
ids, the end-of-infill token, whether a BOS is prepended) are written after the converter's own tokenizer
metadata, replacing its guesses: llama.cpp prefers these keys to its detection of FIM tokens by their text.
``fallback_pre`` names llama.cpp's pre-tokenizer for a vocabulary whose hash the converter does not know (a
tokenizer trained with codetune: byte-level BPE with GPT-2's split rule is llama.cpp's ``gpt-2``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit("usage: llama_cpp_converter.py LLAMA_CPP_DIR KEYS_JSON -- CONVERTER_ARGS...")
    llama_cpp, keys_file, converter_args = Path(argv[0]), Path(argv[1]), argv[3:]
    plan = json.loads(keys_file.read_text(encoding="utf-8"))
    # This script's folder holds codetune's own gguf.py: drop it, so `import gguf` finds llama.cpp's gguf-py.
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(llama_cpp / "gguf-py"), str(llama_cpp)] + [
        p for p in sys.path if Path(p or ".").resolve() != here
    ]
    import convert_hf_to_gguf as converter  # llama.cpp's script; importing it runs nothing

    model_class_of = converter.get_model_class

    def with_codetune_keys(*args, **kwargs):
        base = model_class_of(*args, **kwargs)

        class Converter(base):
            model_arch = base.model_arch  # the converter requires each class to name its own

            def get_vocab_base_pre(self, tokenizer) -> str:
                try:
                    return super().get_vocab_base_pre(tokenizer)
                except NotImplementedError:
                    if plan.get("fallback_pre") is None:
                        raise
                    converter.logger.info("pre-tokenizer: %s (set by codetune)", plan["fallback_pre"])
                    return plan["fallback_pre"]

            def prepare_metadata(self, vocab_only: bool) -> None:
                super().prepare_metadata(vocab_only)
                for key, (kind, value) in plan["keys"].items():
                    self.gguf_writer.remove_key(key)
                    getattr(self.gguf_writer, f"add_{kind}")(key, value)

        Converter.__name__ = Converter.__qualname__ = base.__name__
        return Converter

    converter.get_model_class = with_codetune_keys
    sys.argv = [str(llama_cpp / "convert_hf_to_gguf.py"), *converter_args]
    converter.main()


if __name__ == "__main__":
    main(sys.argv[1:])
