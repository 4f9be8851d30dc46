"""The documents stay in step with the code: every setting in the README, every status and
query word in protocol.md."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from nanomsg import codec
from nanomsg.config import OPTIONS

ROOT = Path(__file__).resolve().parents[2]


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for opt in OPTIONS:
        assert re.search(rf"\| `{opt.flag}`.*\| `{opt.env}` \|", readme), opt.name


def test_protocol_md_names_every_status_and_query_word_the_server_sends() -> None:
    protocol = (ROOT / "protocol.md").read_text()
    frames = [v for v in vars(codec).values() if isinstance(v, bytes)]
    frames += [codec.badargs("r"), codec.history_end(0), codec.revoked(1)]
    frames += [codec.resumed(1, 0, True)]
    frames += [codec.subscribed(1), codec.unsubscribed(1), codec.too_many(1)]
    for frame in frames:
        word = orjson.loads(frame)["data"]
        assert f"`{word}`" in protocol, word


# -- every document stands on its own ------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
INLINE_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
ISSUE_NUMBER = re.compile(r"\bissues?\s*(?:no\.?\s*|number\s*)?#?\d+", re.IGNORECASE)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def documents() -> list[Path]:
    """The project's documents: every Markdown file at the root, in docs/ and in benchmarks/."""
    found = [*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("benchmarks/**/*.md")]
    return sorted(found)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.strip().lower().replace("`", "")
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text, repeated headings numbered as GitHub does."""
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def link_problems(doc: Path, text: str, root: Path) -> list[str]:
    """What is wrong with the links and path mentions of one document (empty when nothing).

    A link must be a web address or a file of the repository that exists (and, with a
    ``#fragment``, a heading of that file); a ``../`` path in a code span must name a file of
    the repository too (a document must not point at files its reader does not have).
    """
    problems = []
    prose = FENCE.sub("", text)
    targets = INLINE_LINK.findall(CODE_SPAN.sub("", prose)) + REFERENCE_LINK.findall(prose)
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            if not target.lower().startswith(("http://", "https://", "mailto:")):
                problems.append(f"{target}: not a web address nor a file of the repository")
            continue
        path_part, _, fragment = target.partition("#")
        if path_part.startswith("/"):
            problems.append(f"{target}: an absolute path, outside the repository")
            continue
        if not path_part:  # a heading of this document
            if fragment not in anchors(text):
                problems.append(f"{target}: no heading {target} in {doc.name}")
            continue
        file = (doc.parent / path_part).resolve()
        if not file.is_relative_to(root):
            problems.append(f"{target}: leaves the repository")
        elif not file.exists():
            problems.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file.read_text()):
            problems.append(f"{target}: no heading #{fragment} in {file.name}")
    for span in CODE_SPAN.findall(prose):
        for word in span.split():
            if not word.startswith("../"):
                continue
            file = (doc.parent / word.partition("#")[0]).resolve()
            if not file.is_relative_to(root):
                problems.append(f"`{word}`: a path outside the repository")
            elif not file.exists():
                problems.append(f"`{word}`: no such file")
    return problems


def issue_mentions(text: str) -> list[str]:
    """Mentions of tracker issues by number: a reader of the repository cannot follow them."""
    return [found.group(0) for found in ISSUE_NUMBER.finditer(text)]


def test_the_link_check_refuses_links_leaving_the_repository_and_missing_targets(
    tmp_path: Path,
) -> None:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text("# Title\n\n## Tokens and keys\n")
    (tmp_path / "outside.md").write_text("# Outside\n")
    doc = root / "docs" / "guide.md"
    good = (
        "See [the README](../README.md), [tokens](../README.md#tokens-and-keys), "
        "[below](#usage), [RFC 6455](https://www.rfc-editor.org/rfc/rfc6455) and `../README.md`."
        "\n\n## Usage\n\n```\n[not a link](../../outside.md)\n```\n"
    )
    assert link_problems(doc, good, root) == []
    bad = (
        "[a](../../outside.md) [b](../missing.md) [c](../README.md#no-such-heading) "
        "[d](/etc/passwd) [e](file:///etc/passwd) [g](#nowhere) "
        "see `../../shared/original/notes.md` and `../shared/sketch.md`\n"
        "\n[f]: ../../outside.md\n"
    )
    assert link_problems(doc, bad, root) == [
        "../../outside.md: leaves the repository",
        "../missing.md: no such file",
        "../README.md#no-such-heading: no heading #no-such-heading in README.md",
        "/etc/passwd: an absolute path, outside the repository",
        "file:///etc/passwd: not a web address nor a file of the repository",
        "#nowhere: no heading #nowhere in guide.md",
        "../../outside.md: leaves the repository",
        "`../../shared/original/notes.md`: a path outside the repository",
        "`../shared/sketch.md`: no such file",
    ]


def test_the_issue_check_finds_issue_numbers_and_nothing_else() -> None:
    bad = "the targets of " + "issue 4; fixed in " + "Issue #12 and in " + "issues 3"
    assert issue_mentions(bad) == ["issue 4", "Issue #12", "issues 3"]
    assert issue_mentions("a known issue with 2 workers; the issue tracker") == []


def test_every_document_links_only_to_files_of_the_repository_that_exist() -> None:
    assert documents(), "no documents found"
    problems = {
        str(doc.relative_to(ROOT)): found
        for doc in documents()
        if (found := link_problems(doc, doc.read_text(), ROOT))
    }
    assert problems == {}


def test_no_document_mentions_an_issue_by_number() -> None:
    mentions = {
        str(doc.relative_to(ROOT)): found
        for doc in documents()
        if (found := issue_mentions(doc.read_text()))
    }
    assert mentions == {}
