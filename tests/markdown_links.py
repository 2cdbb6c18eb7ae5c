"""Markdown references as GitHub resolves them: heading anchors, and the relative links of
a page. Shared by the tests that keep the README, docs/ and the deployment files pointing
at headings that exist."""

import re
from pathlib import Path

FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) with a relative target: not a URL, not a mail address.
INLINE_LINK = re.compile(r"\[[^\]]*\]\((?!https?://|mailto:)([^)\s]*)\)")


def heading_anchors(markdown: str) -> dict[str, int]:
    """{anchor: line index} of the headings, anchored as GitHub renders them: lower case,
    punctuation dropped, spaces to hyphens, a repeated anchor suffixed -1, -2, ...
    Headings in code blocks do not count."""
    anchors: dict[str, int] = {}
    seen: dict[str, int] = {}
    in_code = False
    for index, line in enumerate(markdown.splitlines()):
        if FENCE.match(line):
            in_code = not in_code
            continue
        match = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if in_code or not match:
            continue
        heading = match.group(1)
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors[slug if count == 0 else f"{slug}-{count}"] = index
    return anchors


def broken_links(page: Path, repo: Path) -> list[str]:
    """The inline links of `page` (outside code blocks) whose file or heading is missing,
    or that leave the repository, each as 'page:line: target (why)'."""
    broken = []
    in_code = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
        if in_code:
            continue
        for target in INLINE_LINK.findall(line):
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(repo)}:{number}: {target}"
            if not resolved.is_relative_to(repo):
                broken.append(f"{where} (outside the repository)")
            elif not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif (
                anchor
                and resolved.suffix == ".md"
                and anchor not in heading_anchors(resolved.read_text())
            ):
                broken.append(f"{where} (no such heading)")
    return broken
