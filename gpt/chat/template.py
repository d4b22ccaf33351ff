"""Conversations and the chat template: records -> checked messages -> token ids and a loss mask.

A conversation is a list of messages `{"role": ..., "content": ...}`: an optional `system`
message first, then `user` and `assistant` turns in alternation, at least one of them the
assistant's. Three record shapes are read (`conversation_from_record`): OpenAI's `messages`,
ShareGPT's `conversations` (`from`/`value`, `human`/`gpt`) and Alpaca's
`instruction`/`input`/`output`. A record may also carry a `task`, an `answer` (the one right
reply, for accuracy) and `choices` (the candidate answers, the right one among them, for
likelihood scoring: `gpt.chat.scoring`); `check_choices` checks the last.

The template (`TEMPLATE`, named `gpt-chat-1`) keeps GPT-2's BPE exact: its markers are token ids
of their own in the padded rows of the vocabulary (50257..50260; the model's vocab_size becomes
50261, still padded to 50304, so a base run's weights load unchanged):

    <|endoftext|> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> ...

Content is encoded with `encode_ordinary`: text that spells a marker (or `<|endoftext|>`) stays
plain text, never a special id. Only the assistant's content and its `<|end|>` are targets;
everything else, the `<|assistant|>` marker included (the chat command writes it), is ignored
by the loss (its target is `gpt.model.IGNORE_INDEX`, cross-entropy's ignore_index). The template
is saved in every chat run's checkpoints (`chat_template`), and training, evaluation and the chat
command refuse a run whose template is not this one.

A reply (`stream_reply`) is sampled after `render_prompt(history)`, which is the history cropped
from its oldest turns (the system prompt kept) so that it and the reply fit the context.
"""

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from gpt.checkpoint import checkpoint_path, load_checkpoint, model_from_state
from gpt.config import Config
from gpt.errors import UserError
from gpt.gpt2.pretrained import is_pretrained_source
from gpt.model import GPTModel, ModelConfig
from gpt.sampling import SampleConfig, generate_stream
from gpt.tokenizer import EOT_ID, EOT_TOKEN, TextStream, get_tokenizer

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLES = ("system", "user", "assistant")
MARKERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
SPECIAL_IDS = {SYSTEM: 50257, USER: 50258, ASSISTANT: 50259, END: 50260}  # the padded rows past GPT-2's 50257
END_ID = SPECIAL_IDS[END]
CHAT_VOCAB_SIZE = max(SPECIAL_IDS.values()) + 1  # model.vocab_size of a chat model
TEMPLATE = {  # what a chat run's checkpoints record; an edit here must change the name
    "name": "gpt-chat-1",
    "tokens": dict(SPECIAL_IDS),
    "begin": EOT_TOKEN,
    "layout": "<|endoftext|>, then per message <|role|> content <|end|>; a reply follows <|assistant|>",
}
# ShareGPT's `from` values and what they mean here.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
SHAPES = "messages (OpenAI), conversations (ShareGPT) or instruction/input/output (Alpaca)"


# --------------------------------------------------------------------------- records

def conversation_from_record(record: object, where: str) -> list[dict]:
    """The checked messages of one record in any of the three shapes; `where` names file and line."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is a {type(record).__name__}, not a record; a chat record holds {SHAPES}")
    if "messages" in record:
        messages = _message_list(record["messages"], "messages", where)
        messages = [_message(m, "role", "content", where, i, None) for i, m in enumerate(messages)]
    elif "conversations" in record:
        messages = _message_list(record["conversations"], "conversations", where)
        messages = [_message(m, "from", "value", where, i, SHAREGPT_ROLES) for i, m in enumerate(messages)]
    elif "instruction" in record and "output" in record:
        parts = [record["instruction"], record.get("input") or ""]
        if not all(isinstance(p, str) for p in [*parts, record["output"]]):
            raise UserError(f"{where}: instruction, input and output must be strings")
        messages = [{"role": "user", "content": "\n\n".join(p for p in parts if p.strip())},
                    {"role": "assistant", "content": record["output"]}]
    else:
        fields = ", ".join(list(record)[:10]) or "none"
        raise UserError(f"{where} is not a conversation (its fields: {fields}); a chat record holds {SHAPES}")
    check_conversation(messages, where)
    check_choices(record, where)
    return messages


def _message_list(value: object, field: str, where: str) -> list:
    if not isinstance(value, list):
        raise UserError(f"{where}: {field} is {type(value).__name__}, not a list of messages")
    return value


def _message(item: object, role_key: str, content_key: str, where: str, i: int,
             roles: dict[str, str] | None) -> dict:
    """One message as {"role", "content"}; ShareGPT's role names mapped through `roles`."""
    if not isinstance(item, dict) or role_key not in item or content_key not in item:
        raise UserError(f"{where} message {i + 1} is not {{{role_key!r}: ..., {content_key!r}: ...}}")
    role, content = item[role_key], item[content_key]
    known = roles or {r: r for r in ROLES}
    if role not in known:
        names = ", ".join(known)
        raise UserError(f"{where} message {i + 1} has the unknown role {role!r}; roles are {names}")
    if not isinstance(content, str):
        raise UserError(f"{where} message {i + 1}: {content_key} is {type(content).__name__}, not a string")
    return {"role": known[role], "content": content}


def check_conversation(messages: list[dict], where: str) -> None:
    """A UserError unless: [system], user, assistant, user, ... with at least one assistant turn."""
    if not messages:
        raise UserError(f"{where} is an empty conversation; give it a user and an assistant message")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if message["role"] != expected:
            number = i + 1 + (len(messages) - len(turns))
            after = f"after {turns[i - 1]['role']!r}" if i else "first (after any system message)"
            raise UserError(f"{where}: roles out of order: message {number} is {message['role']!r} {after}; a "
                            "conversation is [system], then user and assistant turns in alternation")
    if not any(m["role"] == "assistant" for m in turns):
        raise UserError(f"{where} has no assistant turn, so nothing to learn; give each conversation a reply")


def check_choices(record: dict, where: str) -> None:
    """A UserError unless a record's `choices`, if it has any, are 2 or more different texts, `answer` among them."""
    if "choices" not in record:
        return
    choices = record["choices"]
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise UserError(f"{where}: \"choices\" must be a list of at least 2 non-empty texts, the candidate answers; "
                        f"got {_short(choices)}")
    seen = set()
    for choice in choices:  # scored stripped (a reply's text): choices that differ in spaces only are one
        if choice.strip() in seen:
            raise UserError(f"{where}: \"choices\" holds {choice.strip()!r} twice; give each candidate once")
        seen.add(choice.strip())
    if "answer" not in record:
        raise UserError(f"{where} has \"choices\" but no \"answer\"; give the right one of them as \"answer\"")
    if record["answer"] not in choices:
        raise UserError(f"{where}: the answer {_short(record['answer'])} is not among its {len(choices)} choices; "
                        "add it to \"choices\" or correct the answer")


def _short(value: object) -> str:
    """`value` for an error line: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def spells_marker(messages: list[dict]) -> bool:
    """True if some content spells a template marker (it stays plain text: counted, not refused)."""
    return any(marker in m["content"] for m in messages for marker in (*SPECIAL_IDS, EOT_TOKEN))


# --------------------------------------------------------------------------- the template

def encode_content(text: str) -> list[int]:
    """GPT-2 BPE of `text`; a marker spelt in it stays plain text (never a special id)."""
    return get_tokenizer().encode_ordinary(text)


def render(messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, trained): the conversation's tokens, and which of them are targets (assistant content + <|end|>)."""
    ids, trained = [EOT_ID], [False]
    for message in messages:
        content = encode_content(message["content"]) + [END_ID]
        learn = message["role"] == "assistant"
        ids += [SPECIAL_IDS[MARKERS[message["role"]]], *content]
        trained += [False] + [learn] * len(content)
    return ids, trained


def render_prompt(messages: list[dict]) -> list[int]:
    """The ids that ask for the next reply: the history, then <|assistant|>."""
    return render(messages)[0] + [SPECIAL_IDS[ASSISTANT]]


def jinja_template() -> str:
    """The template as Jinja, for the chat front ends of other programs (Hugging Face's
    `apply_chat_template`, llama.cpp's chat, LM Studio): with `add_generation_prompt`, the text whose
    tokens (markers parsed as special) are `render_prompt`'s, for content that spells no marker."""
    return ("{{ '" + EOT_TOKEN + "' }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + "
            "message['content'] + '" + END + "' }}{% endfor %}{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}"
            "{% endif %}")


def crop_history(messages: list[dict], budget: int) -> tuple[list[dict], int]:
    """The history without its oldest turns, so that `render_prompt` is at most `budget` ids.

    The system message is kept; turns go from the oldest, a user turn with its reply. If the last
    user message alone is too long, its beginning is cut. Returns (messages, turns dropped).
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(render_prompt(system + turns)) > budget and len(turns) > 1:
        cut = 2 if len(turns) > 2 else 1
        turns, dropped = turns[cut:], dropped + cut
    kept = system + turns
    excess = len(render_prompt(kept)) - budget
    if excess > 0:
        fixed = len(render_prompt(system)) + 2  # the last turn's marker and <|end|>
        if fixed >= budget or not turns:
            raise UserError(f"the system prompt takes {fixed - 2} tokens, too many for a context of "
                            f"{budget} tokens with room for a reply; shorten it")
        enc = get_tokenizer()
        tokens = encode_content(turns[-1]["content"])
        kept = system + [{"role": turns[-1]["role"], "content": enc.decode(tokens[excess:])}]
    return kept, dropped


# --------------------------------------------------------------------------- checkpoints and models

def check_template(saved: object, path: object) -> None:
    """A UserError unless a checkpoint's `chat_template` is this version's; None: never chat-tuned."""
    if saved is None:
        raise UserError(f"{path} was never chat-tuned (its checkpoint has no chat template); fine-tune it "
                        "first (python train.py --config shakespeare-chat.yaml) or sample it with generate.py")
    if saved != TEMPLATE:
        name = saved.get("name") if isinstance(saved, dict) else saved
        raise UserError(f"{path} was trained with the chat template {name!r} and this version uses "
                        f"{TEMPLATE['name']!r}; use the version that trained it, or fine-tune again")


def chat_model_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the template's tokens added to the vocabulary (GPT-2's 50257 -> CHAT_VOCAB_SIZE)."""
    if cfg.vocab_size not in (EOT_ID + 1, CHAT_VOCAB_SIZE):
        raise UserError(f"data.format chat needs a model over GPT-2's vocabulary (50257 ids), and "
                        f"model.vocab_size is {cfg.vocab_size}")
    return dataclasses.replace(cfg, vocab_size=CHAT_VOCAB_SIZE)


def load_chat_model(location: str, device: torch.device) -> tuple[GPTModel, Config, Path]:
    """A chat-tuned run's model (eval mode, on `device`), its config and checkpoint; a UserError for
    GPT-2's weights, a run never chat-tuned, or one tuned with another template."""
    if is_pretrained_source(location):
        check_template(None, location)
    path = checkpoint_path(location)
    return (*chat_model_from_state(load_checkpoint(path), path, device), path)


def chat_model_from_state(state: dict, path: Path, device: torch.device) -> tuple[GPTModel, Config]:
    """The model and config of a checkpoint already read from `path`, if it was tuned with this template."""
    check_template(state.get("chat_template"), path)
    return model_from_state(state, path, device)


# --------------------------------------------------------------------------- replies

@torch.no_grad()
def stream_reply(model: nn.Module, prompt: list[int], cfg: SampleConfig, device: torch.device,
                 generator: torch.Generator | None = None) -> Iterator[int]:
    """The reply's token ids as they are sampled, up to `cfg.max_new_tokens`, until <|end|> (yielded
    last) or another marker or <|endoftext|> (not yielded), or until the context is full."""
    room = min(cfg.max_new_tokens, model.cfg.context_length - len(prompt))
    if room < 1:
        return
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    model.eval()
    for next_id in generate_stream(model, idx, dataclasses.replace(cfg, max_new_tokens=room), END_ID, generator):
        token = int(next_id)
        if token == EOT_ID or (token >= EOT_ID and token != END_ID):
            return
        yield token
        if token == END_ID:
            return


def reply_prompt(history: list[dict], max_new_tokens: int, context_length: int) -> list[int]:
    """The prompt's ids for the reply to `history`: the history cropped from its oldest turns to leave room
    for min(max_new_tokens, half the context) tokens of reply. A UserError if the system prompt leaves none."""
    room = min(max_new_tokens, context_length // 2)
    return render_prompt(crop_history(history, context_length - room)[0])


def reply(model: nn.Module, history: list[dict], cfg: SampleConfig, device: torch.device,
          generator: torch.Generator | None = None, write: Callable[[str], None] | None = None,
          ) -> tuple[str, bool, list[int]]:
    """(text, ended with <|end|>, ids) of the assistant's next turn after `history` (cropped to fit).

    `write` gets the text as it comes, whole UTF-8 characters at a time.
    """
    stream = TextStream()
    text, ids = "", []
    prompt = reply_prompt(history, cfg.max_new_tokens, model.cfg.context_length)
    for token in stream_reply(model, prompt, cfg, device, generator):
        ids.append(token)
        if token == END_ID:
            break
        piece = stream.piece(token)
        text += piece
        if write is not None and piece:
            write(piece)
    tail = stream.end()
    if write is not None and tail:
        write(tail)
    return text + tail, bool(ids) and ids[-1] == END_ID, ids
