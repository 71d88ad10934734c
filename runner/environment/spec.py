"""TEMP stub of runner.environment.spec (replaced by the helper's)."""
from __future__ import annotations
import hashlib, json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

@dataclass(frozen=True)
class EnvSpec:
    kind: Literal["requirements", "pylock", "uv-project"]
    files: tuple[tuple[str, str], ...]
    python: str | None = None
    notes: tuple[str, ...] = ()
    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.kind, self.files, self.python]).encode()).hexdigest()
    def write(self, directory: Path) -> Path:
        for n, t in self.files:
            (directory / n).write_text(t)
        return directory if self.kind == "uv-project" else directory / self.files[0][0]

def _req(text, python=None, notes=()):
    return EnvSpec("requirements", (("requirements.txt", text),), python, tuple(notes))

def from_bytes(name: str, data: bytes) -> EnvSpec:
    text = data.decode()
    if name.endswith(".json"):
        d = json.loads(text)
        if "kind" in d and "files" in d:
            return EnvSpec(d["kind"], tuple(tuple(x) for x in d["files"]), d.get("python"))
        lines = [p["name"] + (p.get("specifier") or "") for p in d.get("packages", [])]
        return _req("\n".join(sorted(lines)) + "\n")
    if name.endswith(".toml") and "pylock" in name:
        return EnvSpec("pylock", (("pylock.toml", text),))
    return _req(text)

def load(path: Path) -> EnvSpec:
    if path.is_dir() or path.name == "pyproject.toml":
        d = path if path.is_dir() else path.parent
        import tomllib
        py = tomllib.loads((d / "pyproject.toml").read_text()).get("project", {}).get("requires-python")
        return EnvSpec("uv-project", (("pyproject.toml", (d / "pyproject.toml").read_text()), ("uv.lock", (d / "uv.lock").read_text())), py)
    return from_bytes(path.name, path.read_bytes())

def find_in(directory: Path) -> EnvSpec | None:
    if (directory / "pylock.toml").is_file():
        return load(directory / "pylock.toml")
    if (directory / "pyproject.toml").is_file() and (directory / "uv.lock").is_file():
        return load(directory)
    if (directory / "senv.json").is_file():
        return load(directory / "senv.json")
    if (directory / "requirements.txt").is_file():
        return load(directory / "requirements.txt")
    return None

def to_bytes(spec: EnvSpec) -> bytes:
    return json.dumps({"kind": spec.kind, "files": spec.files, "python": spec.python}, sort_keys=True).encode()
