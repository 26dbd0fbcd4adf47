"""No code path reads or writes user files around the boundary (issue 11).

Every module of the library is walked; a call that opens, replaces, removes or creates a file
(``open``, ``os.open``, ``os.replace``, ``shutil.rmtree``, ``Path.read_text``, ``tempfile.mkstemp``
...) may appear only in ``loratool/boundary.py`` or in a function listed below with the reason it
is not a user path. A new call anywhere else fails this test: route it through
``loratool.boundary`` (``open_regular``, ``read_json``, ``copy_regular``, ``atomic_path``/
``atomic_dir``) or, if it touches only loratool's own files, add it here with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "loratool"

FS_CALLS = {
    "open", "os.open", "os.replace", "os.rename", "os.unlink", "os.remove", "os.rmdir", "os.link",
    "os.symlink", "os.mkfifo", "os.truncate", "shutil.rmtree", "shutil.copy", "shutil.copy2",
    "shutil.copyfile", "shutil.copytree", "shutil.move", "tempfile.mkstemp", "tempfile.mkdtemp",
    "tempfile.NamedTemporaryFile", "json.load",
}
PATH_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "open", "unlink", "rename",
                "replace", "rmdir", "symlink_to", "hardlink_to", "touch"}

HOME = "the registry's and the hash cache's own files under $LORATOOL_HOME"
TMP = "writes inside the temporary output of boundary.atomic_dir/atomic_path"

# (module, function) -> why the file it touches is not a user's input or output path
ALLOWED: dict[tuple[str, str], str] = {
    ("loratool.safetensors_io", "write_safetensors"):
        "writes the temporary path that atomic_path/atomic_dir handed out, never a user's path",
    ("loratool.schemas.export", "stale"): "a developer command over the repository's own schemas/",
    # Writes inside the temporary output that boundary.atomic_dir/atomic_path created and will
    # read back before renaming it into place:
    ("loratool.merge.writers", "_Prefill._run"): TMP,
    ("loratool.merge.writers", "_Writer.handle"): TMP,
    ("loratool.merge.executor", "_write_other_files"): TMP,
    ("loratool.merge.writers", "_direct_supported"): TMP + " (a probe file for O_DIRECT support)",
    ("loratool.merge.writers", "_DirectFile.__init__"): TMP,
    ("loratool.formats.peft", "write"): TMP,
    ("loratool.manifest", "write_manifest"): TMP,
    ("loratool.manifest", "write_merged_manifest"): TMP + " (before_commit of a merge)",
    ("loratool.merge.api", "_model_card"): TMP + " (before_commit of a merge: the model card, over the copy of "
                                             "the base's card made there)",
    ("loratool.modelcard", "is_ours"): TMP + " (unmerge: whether the card copied into its output is a merge's)",
    ("loratool.merge.engines", "_cpu_only_torch"): "reads torch's own version.py, not a user file",
    # loratool's own files under $LORATOOL_HOME (the registry and the hash cache), which
    # check_output keeps every output away from:
    ("loratool.fingerprint", "HashCache.put"): HOME,
    ("loratool.fingerprint", "DerivationStore.put"): HOME,
    ("loratool.merge.basequant", "_write_file"): TMP + " (merge --output-precision: a file rewritten in 4 bits "
                                                 "beside itself inside the temporary output, then renamed over it)",  # verified 4-bit <- 16-bit relations
    ("loratool.registry.core", "Registry.gc"): HOME,
    ("loratool.registry.core", "Registry.materialize"): HOME,
    ("loratool.registry.store", "BlobStore.lock"): HOME,
    ("loratool.registry.store", "BlobStore._commit_temp"): HOME,
    ("loratool.registry.store", "BlobStore._staging"): HOME,
    ("loratool.registry.store", "BlobStore.read_bytes"): HOME,
    ("loratool.registry.store", "BlobStore.copy_to"): HOME + " (copies a verified blob into a temporary output)",
    ("loratool.registry.store", "BlobStore.clone_to"): HOME + " (read-only copies in materialized/)",
    ("loratool.registry.store", "BlobStore.remove"): HOME,
    ("loratool.schemas.export", "write"): "a developer command over the repository's own schemas/",
}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return "?"


def _calls() -> list[tuple[str, str, int, str]]:
    found = []
    for path in sorted(LIB.rglob("*.py")):
        module = path.relative_to(LIB.parent).with_suffix("").as_posix().replace("/", ".")
        if module == "loratool.boundary":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stack: list[str] = []

        class Visitor(ast.NodeVisitor):
            def visit_FunctionDef(self, node):
                stack.append(node.name)
                self.generic_visit(node)
                stack.pop()

            visit_AsyncFunctionDef = visit_FunctionDef

            def visit_ClassDef(self, node):
                stack.append(node.name)
                self.generic_visit(node)
                stack.pop()

            def visit_Call(self, node):
                name = _name(node.func)
                method = node.func.attr if isinstance(node.func, ast.Attribute) else None
                hit = not name.startswith("boundary.") and name in FS_CALLS or (
                    not name.startswith("boundary.") and
                    method in PATH_METHODS
                    and name != "dataclasses.replace"
                    and not (method == "replace" and len(node.args) == 2)  # str.replace(old, new)
                    and not (method == "read_bytes" and name.startswith("self."))  # our readers' own method
                )
                if hit:
                    found.append((module, ".".join(stack) or "<module>", node.lineno, name))
                self.generic_visit(node)

        Visitor().visit(tree)
    return found


def test_file_access_goes_through_the_boundary():
    stray = [f"{m}:{line} {fn}() calls {name}" for m, fn, line, name in _calls() if (m, fn) not in ALLOWED]
    assert not stray, "file access outside loratool/boundary.py:\n" + "\n".join(stray)


def test_the_allow_list_has_no_stale_entries():
    used = {(m, fn) for m, fn, _, _ in _calls()}
    assert not set(ALLOWED) - used, sorted(set(ALLOWED) - used)
