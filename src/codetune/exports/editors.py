"""Editor set-ups for an exported GGUF: an Ollama Modelfile, a Tabby model folder, a Continue config, and the
"use it in your editor" section of the model card, all laid out with the FIM format the model was trained on.

How the runtimes and plugins build an infill prompt (read from their code; see docs/export.md):

- Ollama renders the model's ``TEMPLATE`` (Go text/template) with ``.Prompt`` = the code before the cursor and
  ``.Suffix`` = the code after it, and only accepts a ``suffix`` when the template mentions ``.Suffix``.
- Continue sends prefix and suffix to Ollama as they are (Ollama lays them out) when the model's template has
  ``.Suffix``; with any other provider (llama.cpp's server included) it renders the prompt itself, from
  ``promptTemplates.autocomplete`` when set, else from a template it picks by the model's *name*.
- Tabby replaces ``{prefix}`` and ``{suffix}`` in ``tabby.json``'s ``prompt_template``.
- llama-server's ``/infill`` lays out PSM from the FIM token ids in the GGUF (``codetune.exports.gguf``).

Every template here is PSM (``prefix-suffix-middle``), one of the two layouts codetune trains (the one
llama-server's ``/infill`` uses). :func:`codetune.data.fim.format_infill_prompt` is the reference: the tests
render each template with its runtime's rules and compare.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from codetune.data.fim import format_infill_prompt
from codetune.data.tokenizer import FIMSentinels
from codetune.exports.gguf import GgufExport
from codetune.storage import atomic_write

TABBY_GGUF = Path("ggml") / "model-00001-of-00001.gguf"
"""Where Tabby looks for the weights inside a model folder."""

# Continue's choice of FIM template by model name (core/autocomplete/templating/AutocompleteTemplate.ts,
# getTemplateForModel, checked in that order; no match falls back to the StarCoder layout). Each entry: the
# family, the name test (all of one group of substrings, any group), the PSM prompt for (prefix, suffix) or None
# for templates that are not FIM prompts, and the stop strings Continue adds.
_CONTINUE_TEMPLATES: list[tuple[str, list[tuple[str, ...]], str | None, list[str]]] = [
    (
        "qwen-coder",
        [("qwen", "coder")],
        "<|fim_prefix|>{p}<|fim_suffix|>{s}<|fim_middle|>",
        ["<|endoftext|>"],
    ),
    (
        "starcoder",
        [
            ("starcoder",),
            ("star-coder",),
            ("starchat",),
            ("octocoder",),
            ("stable",),
            ("codeqwen",),
            ("qwen",),
        ],
        "<fim_prefix>{p}<fim_suffix>{s}<fim_middle>",
        ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>"],
    ),
    ("codestral", [("codestral",)], "[SUFFIX]{s}[PREFIX]{p}", ["[PREFIX]", "[SUFFIX]"]),
    (
        "codegemma",
        [("codegemma",)],
        "<|fim_prefix|>{p}<|fim_suffix|>{s}<|fim_middle|>",
        ["<|file_separator|>"],
    ),
    ("codellama", [("codellama",)], "<PRE> {p} <SUF>{s} <MID>", ["<PRE>", "<SUF>", "<MID>", "<EOT>"]),
    (
        "deepseek",
        [("deepseek",)],
        "<｜fim▁begin｜>{p}<｜fim▁hole｜>{s}<｜fim▁end｜>",
        ["//", "<｜end▁of▁sentence｜>"],
    ),
    ("codegeex", [("codegeex",)], None, []),
    ("chat hole-filler", [("gpt",), ("davinci-002",), ("claude",), ("granite3",)], None, []),
]
_CONTINUE_DEFAULT = _CONTINUE_TEMPLATES[1]
# Names tried, in order, when suggesting a model name Continue reads right.
_NAME_HINTS = ("starcoder", "qwen-coder", "codegemma", "deepseek")
_PROBE = ("def f(x):\n    ", "\n    return y\n")


@dataclass(frozen=True)
class EditorFiles:
    """What :func:`write_editor_files` wrote."""

    modelfile: Path
    tabby: Path
    """The Tabby model folder (``tabby.json`` + ``ggml/model-00001-of-00001.gguf``)."""
    section: str
    """The "use it in your editor" markdown (also returned by :func:`editor_section`)."""


# ---- templates --------------------------------------------------------------------------------------------


def ollama_template(sentinels: FIMSentinels | None) -> str:
    """The Modelfile ``TEMPLATE``: the trained PSM prompt when Ollama is given a suffix, the bare prompt otherwise.

    One line, no whitespace trimming (``{{-``), so nothing next to a sentinel is ever added or removed.
    """
    if sentinels is None:
        return "{{ .Prompt }}"
    for token in (sentinels.prefix, sentinels.suffix, sentinels.middle):
        _refuse_braces(token, "{{", "Go template")
    return (
        f"{{{{ if .Suffix }}}}{sentinels.prefix}{{{{ .Prompt }}}}{sentinels.suffix}{{{{ .Suffix }}}}"
        f"{sentinels.middle}{{{{ else }}}}{{{{ .Prompt }}}}{{{{ end }}}}"
    )


def tabby_prompt_template(sentinels: FIMSentinels) -> str:
    """``tabby.json``'s ``prompt_template``: Tabby substitutes ``{prefix}`` and ``{suffix}``."""
    for token in (sentinels.prefix, sentinels.suffix, sentinels.middle):
        _refuse_braces(token, "{", "Tabby prompt_template")
    return f"{sentinels.prefix}{{prefix}}{sentinels.suffix}{{suffix}}{sentinels.middle}"


def continue_template(sentinels: FIMSentinels) -> str:
    """Continue's ``promptTemplates.autocomplete`` (Handlebars; triple braces insert the code unescaped)."""
    for token in (sentinels.prefix, sentinels.suffix, sentinels.middle):
        _refuse_braces(token, "{{", "Handlebars template")
    return f"{sentinels.prefix}{{{{{{prefix}}}}}}{sentinels.suffix}{{{{{{suffix}}}}}}{sentinels.middle}"


def _refuse_braces(token: str, braces: str, where: str) -> None:
    if braces in token:
        raise ValueError(f"FIM sentinel {token!r} contains {braces!r}, which a {where} would read as markup")


# ---- Continue's reading of a model name ---------------------------------------------------------------------


def continue_family(model_name: str) -> str:
    """The FIM template family Continue picks for ``model_name`` when it renders the prompt itself."""
    return _continue_entry(model_name)[0]


def continue_prompt(model_name: str, prefix: str, suffix: str) -> str | None:
    """The prompt Continue builds from the name alone (None: a chat-style template, not a FIM prompt)."""
    template = _continue_entry(model_name)[2]
    return None if template is None else template.format(p=prefix, s=suffix)


def _continue_entry(model_name: str):
    lower = model_name.lower()
    for entry in _CONTINUE_TEMPLATES:
        if any(all(part in lower for part in group) for group in entry[1]):
            return entry
    return _CONTINUE_DEFAULT


def name_warnings(model_name: str, sentinels: FIMSentinels | None) -> list[str]:
    """Ways Continue would misread ``model_name`` for a model trained with ``sentinels``, each with its fix."""
    if sentinels is None:
        return []
    trained = format_infill_prompt(*_PROBE, "psm", sentinels)
    family = continue_family(model_name)
    warnings = []
    if continue_prompt(model_name, *_PROBE) != trained:
        good = [hint for hint in _NAME_HINTS if continue_prompt(hint, *_PROBE) == trained]
        if not good:
            rename = "; no model name makes Continue build this layout by itself"
        elif continue_prompt("model", *_PROBE) == trained:
            rename = (
                f", or rename the model to a name with no model family in it (or one containing `{good[0]}`)"
            )
        else:
            rename = f", or rename the model to one containing `{good[0]}` and no other model family's name"
        warnings.append(
            f"Continue picks its FIM template from the model name: `{model_name}` gets the {family} layout "
            f"(`{_layout(continue_prompt(model_name, '{prefix}', '{suffix}'))}`), but this model was trained on "
            f"`{format_infill_prompt('{prefix}', '{suffix}', 'psm', sentinels)}`. Fix: keep "
            f"`promptTemplates.autocomplete` in the Continue config (it overrides the name; with Ollama the "
            f"Modelfile's TEMPLATE lays out the prompt){rename}."
        )
    stops = _continue_entry(model_name)[3]
    if "//" in stops:
        warnings.append(
            f"`{model_name}` makes Continue stop completions at `//` (its DeepSeek stop words), cutting them at the "
            "first comment; `promptTemplates.autocomplete` in the Continue config replaces those stop words."
        )
    return warnings


def _layout(prompt: str | None) -> str:
    return "a chat-style instruction prompt" if prompt is None else prompt


# ---- files ------------------------------------------------------------------------------------------------


def modelfile(export: GgufExport, gguf_path: str) -> str:
    """An Ollama Modelfile for ``export``; ``gguf_path`` as ``FROM`` sees it (relative to the Modelfile)."""
    lines = [
        f"# Ollama Modelfile for {export.name}, written by codetune. In this folder: "
        f"ollama create {ollama_name(export.name)} -f Modelfile",
        f"FROM {gguf_path}",
        f'TEMPLATE """{ollama_template(export.sentinels)}"""',
    ]
    for stop in export.stop_strings():
        lines.append(f'PARAMETER stop "{_quoted(stop)}"')
    if export.context_length:
        lines.append(
            f"# Trained context: {export.context_length} tokens. Ollama uses its default num_ctx unless told: "
            f"PARAMETER num_ctx {export.context_length} uses all of it (more memory)."
        )
    if export.sentinels is None:
        lines.append("# The tokenizer has no FIM sentinels: this model completes, it cannot infill.")
    return "\n".join(lines) + "\n"


def tabby_json(export: GgufExport) -> dict[str, str]:
    """``tabby.json`` (no ``prompt_template``: Tabby then treats the model as completion-only)."""
    return {} if export.sentinels is None else {"prompt_template": tabby_prompt_template(export.sentinels)}


def continue_config(model_name: str, export: GgufExport, provider: str = "ollama") -> str:
    """A Continue ``config.yaml`` model entry for autocomplete with the trained FIM template."""
    lines = [
        "models:",
        f"  - name: {model_name}",
        f"    provider: {provider}",
        f"    model: {model_name}",
    ]
    if provider == "llama.cpp":
        lines.append("    apiBase: http://127.0.0.1:8080/")
    lines.append("    roles: [autocomplete]")
    if export.sentinels is not None:
        lines += [
            "    promptTemplates:",
            f"      autocomplete: {json.dumps(continue_template(export.sentinels), ensure_ascii=False)}",
            "    defaultCompletionOptions:",
            f"      stop: {json.dumps(export.stop_strings(), ensure_ascii=False)}",
        ]
    return "\n".join(lines) + "\n"


def ollama_name(name: str) -> str:
    """``name`` as an Ollama model name (lower case; letters, digits, ``.``, ``-``, ``_``)."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name.lower()).strip("-._")
    return cleaned or "codetune-model"


def write_editor_files(
    export: GgufExport, folder: str | Path, model_name: str | None = None, tabby_weights: bool = True
) -> EditorFiles:
    """Write ``Modelfile`` and a Tabby model folder ``tabby/`` under ``folder``.

    With ``tabby_weights`` the Tabby folder gets the GGUF as ``ggml/model-00001-of-00001.gguf``: a hard link
    where the filesystem allows one, else a copy. Without it only ``tabby.json`` is written (e.g. for a folder
    that is uploaded, where a hard link would be uploaded as a second file); the card says where the GGUF goes.
    """
    folder = Path(folder)
    name = model_name or ollama_name(export.name)
    gguf = export.path.resolve()
    relative = os.path.relpath(gguf, folder.resolve())
    modelfile_path = atomic_write(folder / "Modelfile", modelfile(export, f"./{relative}"))
    tabby = folder / "tabby"
    atomic_write(tabby / "tabby.json", json.dumps(tabby_json(export), indent=2, ensure_ascii=False) + "\n")
    if tabby_weights:
        target = tabby / TABBY_GGUF
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(gguf, target)
        except OSError:
            shutil.copy2(gguf, target)
    return EditorFiles(modelfile=modelfile_path, tabby=tabby, section=editor_section(export, name))


# ---- the model card section ----------------------------------------------------------------------------------


def editor_section(export: GgufExport, model_name: str | None = None) -> str:
    """The card's "Use it in your editor" section for ``export`` (markdown)."""
    name = model_name or ollama_name(export.name)
    file = export.path.name
    lines = ["## Use it in your editor", ""]
    if export.sentinels is None:
        lines += [
            f"`{file}` ({export.outtype}) runs in llama.cpp, Ollama and Tabby as a plain completion model. **Infilling "
            "is unavailable**: the tokenizer carries no FIM sentinel set, so editor plugins cannot send the code "
            "after the cursor. Train with a FIM objective (a sentinel set in the tokenizer) to get infilling.",
            "",
            "```bash",
            f"llama-server -m {file} --port 8080",
            f"ollama create {name} -f Modelfile",
            "```",
            "",
        ]
        return "\n".join(lines)
    s = export.sentinels
    psm = format_infill_prompt("{prefix}", "{suffix}", "psm", s)
    lines += [
        f"`{file}` ({export.outtype}) carries the FIM tokens this model was trained with "
        f"(`{s.prefix}` `{s.suffix}` `{s.middle}`, ending at `{s.end}`); llama.cpp reads them from the file. "
        f"Prompt layout (PSM): `{psm}`.",
        "",
        "**llama.cpp**"
        + (
            " — `/infill` builds this prompt from the FIM tokens:"
            if export.infill_endpoint
            else " — send the PSM prompt to `/completion` (this vocabulary makes `/infill` add repository tokens):"
        ),
        "",
        "```bash",
        f"llama-server -m {file} --port 8080",
    ]
    if export.infill_endpoint:
        lines.append(
            "curl -s http://127.0.0.1:8080/infill -d "
            '\'{"input_prefix": "def add(a, b):\\n    ", "input_suffix": "\\n", "n_predict": 32}\''
        )
    else:
        lines.append(
            "curl -s http://127.0.0.1:8080/completion -d "
            + json.dumps(
                json.dumps(
                    {"prompt": psm.replace("{prefix}", "def add(a, b):\n    ").replace("{suffix}", "\n")}
                )
            )
        )
    lines += [
        "```",
        "",
        "Leave llama-server's `--spm-infill` off: its SPM order (`suffix, prefix`) is not the one codetune trains.",
        "",
        "**Ollama** — the `Modelfile` next to the GGUF has a `TEMPLATE` that lays out prefix and suffix as above:",
        "",
        "```bash",
        f"ollama create {name} -f Modelfile",
        f'curl -s http://localhost:11434/api/generate -d \'{{"model": "{name}", "prompt": "def add(a, b):\\n    ", '
        '"suffix": "\\n", "stream": false}\'',
        "```",
        "",
        "**Tabby** — the `tabby/` folder is a Tabby model directory (`tabby.json` with "
        f'`"prompt_template": {json.dumps(tabby_prompt_template(s), ensure_ascii=False)}`, and the GGUF as '
        f"`{TABBY_GGUF.as_posix()}`): `tabby serve --model /abs/path/to/tabby`.",
        "",
        "**Continue** (`~/.continue/config.yaml`) — autocomplete through Ollama; for llama-server use "
        "`provider: llama.cpp` with `apiBase: http://127.0.0.1:8080/`:",
        "",
        "```yaml",
        continue_config(name, export).rstrip(),
        "```",
        "",
    ]
    for warning in name_warnings(name, s):
        lines += [f"> **Model name:** {warning}", ""]
    for note in export.notes:
        lines += [f"> **Note:** {note}", ""]
    return "\n".join(lines)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
