"""How transformers' text-generation pipeline turns token ids into ``generated_text``.

Kaito ran transformers 4.x, whose pipeline decodes prompt + output together and cuts the
decoded prompt off by its character length. That keeps word boundaries right for
SentencePiece tokenizers (Mistral's), where decoding the new tokens alone would drop the
first word's leading space. transformers 5 decodes the new tokens alone; Kaito's clients
saw the 4.x text, so that is what we reproduce.
"""

from functools import cached_property

from app import text_codec
from app.engines.base import Tokenizer


class PipelineDecoder:
    """Decodes one request's sequences; the decoded prompt is computed once, if needed."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], clean_up: bool) -> None:
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_token_ids
        self._clean_up = clean_up

    @cached_property
    def _prompt_chars(self) -> int:
        return len(self._decode(self._prompt_ids))

    def _decode(self, token_ids: list[int]) -> str:
        return text_codec.decode(
            self._tokenizer, token_ids, skip_special_tokens=True, clean_up=self._clean_up
        )

    def new_text(self, output_token_ids: list[int]) -> str:
        return self._decode(self._prompt_ids + output_token_ids)[self._prompt_chars :]

    def generated_text(
        self,
        prompt_text: str,
        output_token_ids: list[int],
        full: bool,
        new_text: str | None = None,
    ) -> str:
        """The pipeline's ``generated_text``: the prompt (without the prefix) when full.
        ``new_text``: this sequence's new_text when already decoded (a stream's)."""
        new = self.new_text(output_token_ids) if new_text is None else new_text
        return prompt_text + new if full else new

    def stream(self) -> "StreamedText":
        """One sequence's new_text, piece by piece as its tokens arrive."""
        return StreamedText(self)


class StreamedText:
    """One sequence's new_text in pieces, one per token, that join into new_text.

    Each piece comes from an incremental decode of a short window
    (text_codec.IncrementalDecoder), so the 2000th token costs what the first did. With
    the last token the whole sequence is decoded the pipeline's way, once: that is the
    final reply's text, and what the window held back (a character cut off by the length
    limit) goes out with that token.
    """

    def __init__(self, decoder: PipelineDecoder) -> None:
        self._decoder = decoder
        self._incremental = text_codec.IncrementalDecoder(
            decoder._tokenizer,
            decoder._prompt_ids,
            skip_special_tokens=True,
            clean_up=decoder._clean_up,
        )
        self._pieces: list[str] = []
        self.token_ids: list[int] = []
        self.text: str | None = None  # new_text, once the last token is in

    def push(self, token: int, last: bool = False) -> str:
        """The text ``token`` adds ("" while a character is incomplete)."""
        self.token_ids.append(token)
        piece = self._incremental.push(token)
        self._pieces.append(piece)
        if last:
            self.text = self._decoder.new_text(self.token_ids)
            sent = "".join(self._pieces)
            # With clean_up_tokenization_spaces a later token can re-space text already
            # sent (docs/STREAMING.md); what was sent cannot be taken back.
            if self.text.startswith(sent):
                piece += self.text[len(sent) :]
        return piece

    def finish(self) -> str:
        """new_text, for a sequence whose stream ended without a last token."""
        if self.text is None:
            self.text = self._decoder.new_text(self.token_ids)
        return self.text
