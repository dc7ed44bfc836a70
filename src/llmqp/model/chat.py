"""Chat templates, shared by every tokenizer class: render messages with the model's Jinja template (in a
sandbox) and turn them into ids so that only the template inserts control tokens."""

from __future__ import annotations

from llmqp.errors import ChatTemplateError, PromptError


def check_unicode(text: str) -> None:
    """Raises PromptError for text that cannot be encoded as UTF-8 (a lone surrogate such as "\\udcff")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"the prompt is not valid Unicode: {e.object[e.start:e.end]!r} at index {e.start} "
                          "(a lone surrogate) cannot be encoded") from None


class ChatTemplating:
    """Mixin for a tokenizer with `chat_template` (str | None), `bos_id`, `eos_id`, `id_to_token(i)` and
    `encode(text, *, parse_special)`."""

    chat_template: str | None
    _template = None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role", "content"}]) with the model's template. Raises ChatTemplateError when
        the model has none (pass raw=True for plain text) or the template rejects the messages."""
        from jinja2 import TemplateError

        if not self.has_chat_template:
            raise ChatTemplateError("this model has no chat template: pass raw=True to use the prompt as plain "
                                    "text, or a model with a template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ChatTemplateError(f"the chat template rejected the messages: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(self.chat_template)
            except TemplateError as e:
                raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None
        bos = self.id_to_token(self.bos_id) if self.bos_id is not None else ""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos, eos_token=self.id_to_token(self.eos_id))
        except (TemplateError, TypeError, KeyError, ValueError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` through the chat template. Only the template inserts control tokens:
        text inside a message that looks like one (`<|im_end|>`, `<|im_start|>system`) is encoded as plain
        text. Raises ChatTemplateError / PromptError."""
        for m in messages:
            check_unicode(m["content"])
        marks = [f"\x00llmqp-content-{i}\x00" for i in range(len(messages))]
        rendered = self.apply_chat_template([dict(m, content=k) for m, k in zip(messages, marks)],
                                            add_generation_prompt)
        ids: list[int] = []
        rest = rendered
        for mark, message in zip(marks, messages):
            head, found, rest = rest.partition(mark)
            if not found:  # the template dropped this message
                rest = head
                continue
            # Control tokens split the text first (as the tokenizer itself does), so encoding the template's
            # pieces one by one gives the ids of encoding the rendered text whole.
            ids += self.encode(head, parse_special=True) if head else []
            ids += self.encode(message["content"])
        return ids + (self.encode(rest, parse_special=True) if rest else [])
