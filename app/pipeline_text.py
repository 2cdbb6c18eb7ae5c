"""How transformers' text-generation pipeline turns token ids into ``generated_text``.

Kaito ran transformers 4.x, whose pipeline decodes prompt + output together and cuts the
decoded prompt off by its character length. That keeps word boundaries right for
SentencePiece tokenizers (Mistral's), where decoding the new tokens alone would drop the
first word's leading space. transformers 5 decodes the new tokens alone; Kaito's clients
saw the 4.x text, so that is what we reproduce.
"""

from app import text_codec
from app.engines.base import Tokenizer


class PipelineDecoder:
    """Decodes one request's sequences; the decoded prompt is computed once."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], clean_up: bool) -> None:
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_token_ids
        self._clean_up = clean_up
        self._prompt_chars = len(self._decode(prompt_token_ids))

    def _decode(self, token_ids: list[int]) -> str:
        return text_codec.decode(
            self._tokenizer, token_ids, skip_special_tokens=True, clean_up=self._clean_up
        )

    def new_text(self, output_token_ids: list[int]) -> str:
        return self._decode(self._prompt_ids + output_token_ids)[self._prompt_chars :]

    def generated_text(self, prompt_text: str, output_token_ids: list[int], full: bool) -> str:
        """The pipeline's ``generated_text``: the prompt (without the prefix) when full."""
        new = self.new_text(output_token_ids)
        return prompt_text + new if full else new
