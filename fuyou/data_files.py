"""Reading data files: text and JSONL records into examples, validated line by line.

An example is a list of `Piece`s: text (or the EOS placeholder) with a flag saying whether its tokens
are loss targets. `fuyou.data` tokenizes the pieces and cuts rows; this module only reads and
validates, so every user mistake surfaces here, before training, as a `DataError` naming file:line.

Files:
    a .txt file  plain text, documents separated by one or more blank lines.
    a directory  every *.txt file below it (sorted by path) is one document.
                 Text documents are stripped of surrounding whitespace; every token is a target.
    a .jsonl     one JSON object a line, in one of three shapes (blank lines are skipped):
                   {"text": "..."}                             loss on every token
                   {"prompt": "...", "completion": "..."}      loss on the completion only
                   {"messages": [{"role": "user", "content": "..."}, ...]}   loss on assistant turns only
                 Other keys on a line are ignored, so records may carry ids or metadata.

Prompt and completion are tokenized separately, so a token boundary falls exactly between them; put
the space or newline that separates them on the side you want.

Built-in chat format (a `tokenizer.json` carries no chat template), one block per message, in order:
    "System:\\n{content}\\n"   no loss
    "User:\\n{content}\\n"     no loss
    "Assistant:\\n"            no loss, then "{content}" + EOS   loss
Headers end with a newline, a boundary most pre-tokenizers split on anyway, so tokenizing the pieces
separately seldom changes the tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from fuyou.errors import DataError

CHAT_ROLES = ("system", "user", "assistant")
EOS_PLACEHOLDER = -1  # Piece content standing for the tokenizer's EOS id, which readers do not know
_BLANK_LINES = re.compile(r"\n\s*\n")


class Piece(NamedTuple):
    """Part of an example: text to tokenize, or EOS_PLACEHOLDER; and whether its tokens are targets."""

    content: str | int
    is_target: bool


def read_examples(path: Path, source: str, format: str) -> list[list[Piece]]:
    """Read and validate a whole text or JSONL file, or a directory of text files.

    Args:
        path: The file or directory.
        source: The source as the user wrote it, for the message when `path` does not exist.
        format: "auto" (from the suffix), "text" or "jsonl".

    Returns:
        One list of pieces per example, in file order.

    Raises:
        DataError: The path is missing, empty or malformed; the message names file and line.
    """
    if not path.exists():
        raise DataError(
            f"data source {source!r} is neither 'synthetic', 'random' nor an existing .txt/.jsonl file or directory"
        )
    if path.is_dir():
        if format == "jsonl":
            raise DataError(f"{path} is a directory; the jsonl format reads one .jsonl file, so point at that file")
        examples = _read_text_directory(path)
    else:
        if format == "auto":
            if path.suffix not in (".txt", ".jsonl"):
                raise DataError(
                    f"{path}: cannot tell its format from the suffix {path.suffix!r}; "
                    "name it .txt or .jsonl, or set the data format to 'text' or 'jsonl'"
                )
            format = path.suffix[1:]
        examples = _read_jsonl(path) if format == "jsonl" else _read_text_file(path)
    if not examples:
        raise DataError(f"{path}: no examples in it (empty, or only blank lines); point at a file with data")
    return examples


def _read_utf8(path: Path) -> str:
    """Contents of `path`, or DataError naming the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_number = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line_number}: not UTF-8 text ({error.reason}); re-encode the file as UTF-8") from None


def _read_text_file(path: Path) -> list[list[Piece]]:
    """One example per run of text between blank lines, stripped, every token a target."""
    documents = (document.strip() for document in _BLANK_LINES.split(_read_utf8(path)))
    return [[Piece(document, True)] for document in documents if document]


def _read_text_directory(path: Path) -> list[list[Piece]]:
    """One example per *.txt file below `path`, every token a target."""
    file_paths = sorted(file_path for file_path in path.rglob("*.txt") if file_path.is_file())
    if not file_paths:
        raise DataError(f"{path} is a directory without .txt files; add some or point at a .jsonl file")
    documents = (_read_utf8(file_path).strip() for file_path in file_paths)
    return [[Piece(document, True)] for document in documents if document]


def _read_jsonl(path: Path) -> list[list[Piece]]:
    """One example per non-blank line; DataError naming `path:line` for the first bad line."""
    examples = []
    for line_number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        examples.append(_parse_record(record, where))
    return examples


_SHAPES = {"text": ("text",), "prompt/completion": ("prompt", "completion"), "messages": ("messages",)}


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", type(None): "null"}
    return names[type(value)]


def _require_string(value: object, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} must be a string, got {_json_type(value)}")
    return value


def _parse_record(record: object, where: str) -> list[Piece]:
    """Pieces of one JSONL record in any of the three shapes."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(record)}")
    shapes = [shape for shape, keys in _SHAPES.items() if any(key in record for key in keys)]
    if len(shapes) != 1:
        found = f"has {' and '.join(shapes)}" if shapes else f"has keys {sorted(record)}"
        raise DataError(
            f'{where}: {found}; each line needs exactly one of "text", "prompt"+"completion" or "messages"'
        )
    if shapes[0] == "text":
        return [Piece(_require_string(record["text"], '"text"', where), True)]
    if shapes[0] == "prompt/completion":
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f'{where}: has "prompt" or "completion" but not both; add "{key}"')
        prompt = _require_string(record["prompt"], '"prompt"', where)
        return [Piece(prompt, False), Piece(_require_string(record["completion"], '"completion"', where), True)]
    return _parse_messages(record["messages"], where)


def _parse_messages(messages: object, where: str) -> list[Piece]:
    """Pieces of a conversation in the built-in chat format (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        kind = "an empty array" if messages == [] else _json_type(messages)
        raise DataError(f'{where}: "messages" must be a non-empty array of {{"role", "content"}} objects, got {kind}')
    pieces = []
    for index, message in enumerate(messages):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(f'{where}: {name} must be an object with "role" and "content", got {_json_type(message)}')
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f'{where}: {name} has no "{key}"; every message needs "role" and "content"')
        role = message["role"]
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: {name}.role is {role!r}; use one of {', '.join(CHAT_ROLES)}")
        content = _require_string(message["content"], f"{name}.content", where)
        if role == "assistant":
            pieces += [Piece("Assistant:\n", False), Piece(content, True), Piece(EOS_PLACEHOLDER, True)]
        else:
            pieces.append(Piece(f"{role.capitalize()}:\n{content}\n", False))
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: conversation has no assistant message, so nothing to learn; add one or drop it")
    return pieces
