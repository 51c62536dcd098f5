"""Repository-level documents: the files of one repository joined in dependency order.

StarCoder2, DeepSeek-Coder and Qwen2.5-Coder pretrain on whole repositories: the files concatenated so that each
file comes after the files it imports, each introduced by the base's own repository and file tokens::

    StarCoder2      <repo_name>name<file_sep>path\\ncode<file_sep>path\\ncode ...
    Qwen2.5-Coder   <|repo_name|>name\\n<|file_sep|>path\\ncode\\n<|file_sep|>path\\ncode\\n ...

A tokenizer without such tokens gets the plain-text header of ``CodeFiles(metadata_prefix=true)`` instead: a line
comment in the file's own language naming ``repo/path`` (``# mypkg/core.py``), which needs no new token.

**Order.** Python imports are parsed with :mod:`ast` (``import a.b``, ``from . import c``, relative imports
resolved against the file's package; an import is matched to the repository's file by every dotted suffix of its
path, so ``src/pkg/a.py`` answers to ``pkg.a``). Files are emitted topologically with ties broken by path; a cycle
(``a`` imports ``b`` imports ``a``) is one strongly connected component whose files come out in path order, so the
same repository always gives the same order. Other languages have no parsed imports and keep path order.

**Size.** A repository becomes one or more documents: files are added in order while the document stays within
a token budget (the data module's ``seq_len`` unless the source sets ``max_document_tokens``), so
document-level FIM can transform every document; a file longer than the budget is a document of its own and is
cut across rows like any long document.

**Layout.** Each document carries its *layout*: pieces ``(kind, start, end)`` covering its text, ``kind`` being
plain text (headers), a special token (encoded as that one token id, never matched inside code) or a file body
(what repository-level FIM may transform, :meth:`codetune.data.fim.FIMTransform.encode_repository`).
"""

from __future__ import annotations

import ast
import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from codetune.data.git import language_of
from codetune.data.sources import Document

TEXT, TOKEN, BODY = 0, 1, 2
"""Layout piece kinds: plain text, one special token, a file's body."""


@dataclass(frozen=True)
class RepoTokens:
    """A base's repository-level tokens."""

    repo_name: str
    """Starts a repository document, followed by the repository's name."""
    file_sep: str
    """Starts each file, followed by its path and a newline."""
    newlines: bool = False
    """Qwen2.5-Coder's layout: a newline after the repository name and after each file's code."""


REPO_TOKEN_SETS: dict[str, RepoTokens] = {
    "starcoder2": RepoTokens("<repo_name>", "<file_sep>"),
    "qwen2.5-coder": RepoTokens("<|repo_name|>", "<|file_sep|>", newlines=True),
}


def repo_tokens(tokenizer: Any) -> RepoTokens | None:
    """The repository tokens ``tokenizer``'s vocabulary carries (of several sets, the one added last), else None."""
    vocab = tokenizer.get_vocab()
    carried = [s for s in REPO_TOKEN_SETS.values() if s.repo_name in vocab and s.file_sep in vocab]
    if not carried:
        return None
    return max(carried, key=lambda s: min(vocab[s.repo_name], vocab[s.file_sep]))


# --- dependency order ----------------------------------------------------------------------------------


def module_names(path: str, root_package: str | None = None) -> list[str]:
    """Every dotted name a Python file may be imported as: ``src/pkg/a.py`` -> ``src.pkg.a``, ``pkg.a``, ``a``
    (a package's ``__init__.py`` answers to the package). ``root_package`` (a repository whose root is the
    package, like a copy of ``json/``) adds ``root_package.src.pkg.a`` and so on."""
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    names = [".".join(parts[i:]) for i in range(len(parts))]
    if root_package:
        names.append(".".join([root_package, *parts]))
    return names


def python_imports(path: str, text: str) -> list[list[str]]:
    """What a Python file imports, one list per imported name: the dotted names it may resolve to, most
    specific first (``from a import b`` -> ``[a.b, a]``: ``b`` may be a module or a name in ``a``); relative
    imports are resolved against the file's path. ``[]`` when the file does not parse.

    Only the named module counts, not the packages above it: ``import a.b`` runs ``a/__init__.py`` too, but
    ordering every module after its package's ``__init__`` (which often imports the modules back) would turn
    each package into one cycle.
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    found: list[list[str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.append([".".join(parts[:i]) for i in range(len(parts), 0, -1)])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = list(PurePosixPath(path).parts[:-1])
                if node.level > 1:
                    package = package[: max(0, len(package) - (node.level - 1))]
                base = ".".join([*package, *(node.module.split(".") if node.module else [])])
            else:
                base = node.module or ""
            parts = base.split(".") if base else []
            bases = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
            for alias in node.names:
                if alias.name == "*":
                    found.append(bases)
                else:
                    found.append([f"{base}.{alias.name}" if base else alias.name, *bases])
    return found


def import_graph(files: dict[str, str], root_package: str | None = None) -> dict[str, set[str]]:
    """File -> the repository files it imports (Python only; other files import nothing)."""
    owners: dict[str, str] = {}
    # A dotted name is claimed by the file with the shortest path, then the first in path order (deterministic).
    for path in sorted(files, key=lambda p: (len(PurePosixPath(p).parts), p)):
        if path.endswith((".py", ".pyi")):
            for name in module_names(path, root_package):
                owners.setdefault(name, path)
    graph: dict[str, set[str]] = {path: set() for path in files}
    for path, text in files.items():
        if path.endswith((".py", ".pyi")):
            for candidates in python_imports(path, text):
                owner = next((owners[n] for n in candidates if n in owners), None)
                if owner is not None and owner != path:
                    graph[path].add(owner)
    return graph


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative, nodes visited in path order)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return out


def dependency_order(files: dict[str, str], root_package: str | None = None) -> list[str]:
    """The files' paths so that every file comes after the files it imports (cycles: path order inside the
    cycle), ties broken by path; the same input always gives the same order."""
    graph = import_graph(files, root_package)
    components = _components(graph)
    component_of = {path: i for i, members in enumerate(components) for path in members}
    needs: list[set[int]] = [set() for _ in components]
    for path, deps in graph.items():
        needs[component_of[path]].update(
            component_of[d] for d in deps if component_of[d] != component_of[path]
        )
    users: list[set[int]] = [set() for _ in components]
    for i, deps in enumerate(needs):
        for d in deps:
            users[d].add(i)
    waiting = [len(deps) for deps in needs]
    ready = [(components[i][0], i) for i in range(len(components)) if not waiting[i]]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.extend(components[i])
        for user in users[i]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, (components[user][0], user))
    return order


# --- layout --------------------------------------------------------------------------------------------


Piece = tuple[int, str]
"""``(kind, text)``: one piece of a repository document."""


def comment_marker(path: str) -> str:
    """The line-comment marker of a file's language (``#`` when unknown)."""
    return language_of(path)[1]


def start_pieces(repo: str, tokens: RepoTokens | None) -> list[Piece]:
    """What opens a repository document: the repository token and name (nothing in plain-text mode)."""
    if tokens is None:
        return []
    return [(TOKEN, tokens.repo_name), (TEXT, repo + ("\n" if tokens.newlines else ""))]


def header_pieces(repo: str, path: str, tokens: RepoTokens | None, marker: str = "#") -> list[Piece]:
    """What introduces one file: the file token and path, or the plain-text comment ``# repo/path``."""
    if tokens is None:
        return [(TEXT, f"{marker} {repo}/{path}\n")]
    return [(TOKEN, tokens.file_sep), (TEXT, path + "\n")]


def file_pieces(repo: str, path: str, code: str, tokens: RepoTokens | None, marker: str = "#") -> list[Piece]:
    """A file's header, its code, and the newline that keeps the next header on its own line."""
    pieces = [*header_pieces(repo, path, tokens, marker), (BODY, code)]
    if (tokens is None and not code.endswith("\n")) or (tokens is not None and tokens.newlines):
        pieces.append((TEXT, "\n"))
    return pieces


def join_pieces(pieces: Sequence[Piece]) -> tuple[str, list[int]]:
    """The document text and its flat layout ``[kind, start, end, ...]``."""
    text, layout, at = [], [], 0
    for kind, piece in pieces:
        if not piece:
            continue
        text.append(piece)
        layout.extend((kind, at, at + len(piece)))
        at += len(piece)
    return "".join(text), layout


def layout_pieces(text: str, layout: Sequence[int]) -> list[Piece]:
    """The pieces a flat layout describes."""
    return [(int(layout[i]), text[layout[i + 1] : layout[i + 2]]) for i in range(0, len(layout), 3)]


def file_headers(text: str, layout: Sequence[int]) -> list[str]:
    """The header of each file of a repository document, as its text reads (``<file_sep>a.py\n`` or
    ``# repo/a.py\n``), in document order: the text piece just before each body, with the file token before it."""
    pieces = layout_pieces(text, layout)
    headers = []
    for i, (kind, _) in enumerate(pieces):
        if kind == BODY and i > 0 and pieces[i - 1][0] == TEXT:
            token = pieces[i - 2][1] if i > 1 and pieces[i - 2][0] == TOKEN else ""
            headers.append(token + pieces[i - 1][1])
    return headers


def encode_pieces(tokenizer: Any, pieces: Sequence[Piece]) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character spans of a repository document: each special-token piece as its one id, text pieces
    encoded by ``tokenizer`` (a ``tokenizers`` backend with special-token matching off)."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    for kind, piece in pieces:
        if kind == TOKEN:
            token_id = tokenizer.token_to_id(piece)
            if token_id is None:
                raise ValueError(f"the tokenizer has no token {piece!r} for repository documents")
            ids.append(token_id)
            offsets.append((at, at + len(piece)))
        elif piece:
            enc = tokenizer.encode(piece, add_special_tokens=False)
            ids.extend(enc.ids)
            offsets.extend((at + a, at + b) for a, b in enc.offsets)
        at += len(piece)
    return ids, offsets


# --- assembling documents ------------------------------------------------------------------------------


class RepositoryAssembler:
    """Turns the curated file documents of repository sources into repository-level documents.

    ``budgets`` maps each repository source's name to its document token budget; documents of other sources
    pass through untouched. Files of one repository arrive together (the git source yields them so); train and
    validation files are joined separately, so a held-out file is never in a training document.
    """

    def __init__(self, tokenizer: Any, tokens: RepoTokens | None, budgets: dict[str, int]) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.budgets = dict(budgets)

    def _count(self, pieces: Sequence[Piece]) -> int:
        return len(encode_pieces(self.tokenizer, pieces)[0])

    def documents_of(self, source: str, repo: str, files: list[Document]) -> list[Document]:
        """One repository's files (of one split side) as repository documents, in dependency order."""
        by_path = {f.meta["path"]: f for f in files}
        order = dependency_order({p: f.text for p, f in by_path.items()}, repo)
        budget = self.budgets[source]
        groups: list[list[Document]] = []
        used = 0
        opening = self._count(start_pieces(repo, self.tokens)) + 2  # BOS / end-of-text
        for path in order:
            f = by_path[path]
            size = self._count(file_pieces(repo, path, f.text, self.tokens, comment_marker(path)))
            if not groups or used + size > budget:
                groups.append([])
                used = opening
            groups[-1].append(f)
            used += size
        out = []
        for k, group in enumerate(groups):
            pieces = start_pieces(repo, self.tokens)
            for f in group:
                pieces += file_pieces(
                    repo, f.meta["path"], f.text, self.tokens, comment_marker(f.meta["path"])
                )
            text, layout = join_pieces(pieces)
            meta = {
                "repo": repo,
                "files": [f.meta["path"] for f in group],
                "layout": layout,
                "split": group[0].meta.get("split"),
                "commit": group[0].meta.get("commit"),
            }
            out.append(Document(text=text, doc_id=f"{repo}#{k}", source=source, meta=meta))
        return out

    def run(self, documents: Iterable[Document]) -> Iterator[Document]:
        """The stream with each repository's files replaced by its repository documents (train side first)."""
        current: tuple[str, str] | None = None
        buffer: list[Document] = []

        def flush() -> Iterator[Document]:
            if current is None or not buffer:
                return
            for side in ("train", "validation", None):
                files = [d for d in buffer if d.meta.get("split") == side]
                if files:
                    named = [d for d in files if "path" in d.meta]
                    yield from self.documents_of(current[0], current[1], named)

        for doc in documents:
            if doc.source not in self.budgets:
                yield doc
                continue
            key = (doc.source, str(doc.meta.get("repo")))
            if key != current:
                yield from flush()
                current, buffer = key, []
            buffer.append(doc)
        yield from flush()


def with_context(files: Sequence[Document]) -> Iterator[tuple[Document, list[Document]]]:
    """Each file with the files before it in its repository's dependency order (for scoring with context)."""
    by_repo: dict[str, list[Document]] = {}
    for f in files:
        by_repo.setdefault(str(f.meta["repo"]), []).append(f)
    for repo in sorted(by_repo):
        by_path = {f.meta["path"]: f for f in by_repo[repo]}
        order = dependency_order({p: f.text for p, f in by_path.items()}, repo)
        for i, path in enumerate(order):
            yield by_path[path], [by_path[p] for p in order[:i]]


__all__ = [
    "BODY",
    "REPO_TOKEN_SETS",
    "TEXT",
    "TOKEN",
    "RepoTokens",
    "RepositoryAssembler",
    "dependency_order",
    "encode_pieces",
    "file_headers",
    "file_pieces",
    "header_pieces",
    "import_graph",
    "join_pieces",
    "layout_pieces",
    "module_names",
    "python_imports",
    "repo_tokens",
    "start_pieces",
    "with_context",
]
