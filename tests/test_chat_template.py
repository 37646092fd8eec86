"""GLM's own chat template (GLM-4.6's, as zai-org ships it, written into every model the maker
makes) renders through glmoe's sandboxed jinja2 exactly as transformers renders it, for system,
user, assistant, tool calls, tool results and thinking on/off; and hostile templates are contained."""
from __future__ import annotations

import os

import pytest

import glmoe.tools
from glmoe.chat import render_chat

transformers_chat = pytest.importorskip("transformers.utils.chat_template_utils")

TEMPLATE_PATH = os.path.join(os.path.dirname(glmoe.tools.__file__), "glm4moe_chat_template.jinja")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

CONVERSATIONS = {
    "system-user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    "multi-turn-with-thinking": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>simple sum</think>4"},
        {"role": "user", "content": "and 3+3? 请用中文 🙂"},
    ],
    "reasoning-content-field": [
        {"role": "user", "content": "why?"},
        {"role": "assistant", "content": "because", "reasoning_content": "thinking it over"},
    ],
    "tool-call-and-result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"wind": 3}'},
    ],
    "content-parts": [{"role": "user", "content": [{"type": "text", "text": "part one "}, {"type": "text", "text": "two"}]}],
}


@pytest.fixture(scope="module")
def template():
    with open(TEMPLATE_PATH, encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [None, True, False])
def test_glm_template_renders_like_transformers(template, name, thinking):
    messages = CONVERSATIONS[name]
    tools = [WEATHER_TOOL] if "tool" in name else None
    extra = {} if thinking is None else {"enable_thinking": thinking}
    ours = render_chat(template, messages, tools=tools, add_generation_prompt=True, **extra)
    theirs = transformers_chat.render_jinja_template(
        conversations=[messages], tools=tools, chat_template=template, add_generation_prompt=True, **extra
    )
    theirs = theirs[0][0] if isinstance(theirs, tuple) else theirs
    theirs = theirs[0] if isinstance(theirs, list) else theirs
    assert ours == theirs
    assert ours.startswith("[gMASK]<sop>") and ours.rstrip().endswith(("<|assistant|>", "<think></think>"))
    if thinking is False:
        assert "/nothink" in ours


def test_rendered_prompt_tokenizes_to_control_tokens(template, tmp_path):
    from glmoe.tools.make_model import PRESETS, ModelSpec, write_model
    import glmoe

    path = str(tmp_path / "m.gguf")
    write_model(path, ModelSpec(**PRESETS["tiny"]), seed=1)
    llm = glmoe.Llama(path, n_ctx=256, verbose=False)
    assert llm.chat_template == template
    text = render_chat(template, CONVERSATIONS["system-user"])
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    tok = llm.tokenizer_
    pieces = [tok.token_to_piece(i, special=True) for i in ids]
    for control in (b"[gMASK]", b"<sop>", b"<|system|>", b"<|user|>", b"<|assistant|>"):
        assert control in pieces


@pytest.mark.parametrize(
    "hostile",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% for x in range(10**9) %}{% endfor %}",  # jinja's sandbox caps range()
        "{{ raise_exception('nope') }}",
    ],
)
def test_hostile_templates_are_refused_not_run(hostile):
    with pytest.raises(ValueError, match="chat template"):
        render_chat(hostile, [{"role": "user", "content": "x"}])
