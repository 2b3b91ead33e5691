"""Prints pip's package sources as uv command-line arguments, for `make install`.

uv reads neither pip.conf nor the PIP_* variables, so a machine whose pip is set up to find packages somewhere
(a find-links folder of local wheels, a mirror as index-url, more indexes) would send uv to PyPI alone. This hands
uv the same sources, with pip's rule of taking the best version from any index (uv's default takes the first index
that has the package, and then fails when that index lacks the pinned version).

    uv pip install $(python launch/pip_sources_for_uv.py) -r requirements.txt
"""

import ast
import subprocess
import sys

FLAGS = {"find-links": "--find-links", "index-url": "--index-url", "extra-index-url": "--extra-index-url"}


def uv_args(pip_config_list: str) -> list[str]:
    """uv arguments from the output of `pip config list` (lines `scope.key=<Python repr of the value>`; a value may
    list several, separated by blanks or newlines)."""
    values: dict[str, list[str]] = {key: [] for key in FLAGS}
    index_url_from_env = None
    for line in pip_config_list.splitlines():
        name, sep, raw = line.partition("=")
        scope, _, key = name.rpartition(".")
        if not sep or key not in FLAGS:
            continue
        try:
            words = str(ast.literal_eval(raw)).split()
        except (SyntaxError, ValueError):
            words = raw.split()
        if key == "index-url" and scope == ":env:":
            index_url_from_env = words  # PIP_INDEX_URL wins over every configuration file, as in pip
        for word in words:
            if word not in values[key]:
                values[key].append(word)
    if index_url_from_env:
        values["index-url"] = index_url_from_env
    args = ["--index-strategy", "unsafe-best-match"]
    for key, flag in FLAGS.items():
        chosen = values[key][-1:] if key == "index-url" else values[key]
        for value in chosen:
            args += [flag, value]
    return args


def main() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    print(" ".join(uv_args(listed)))  # words without blanks (split above): safe for the shell's word splitting


if __name__ == "__main__":
    main()
