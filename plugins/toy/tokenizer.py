"""The toy world's word-level tokenizer, saved so ``AutoTokenizer.from_pretrained`` loads it."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from qcompare_plugins.toy.world import vocabulary

PAD, UNK, EOS = "<pad>", "<unk>", "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL = [PAD, UNK, EOS] + [f"<|{r}|>" for r in ROLES]

# Every token is separated by one space, so the rendered chat splits into known words.
# ``generation`` marks the assistant's tokens for SFTTrainer's assistant_only_loss; GKD
# renders all but the last message with add_generation_prompt=True as the prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('toy chat roles are system, user and assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|> ' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + ' <|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + ' <|end|>' }}{% endif %}"
    "{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: one id per word of the world, specials first (pad is id 0)."""
    words = SPECIAL + [w for w in vocabulary() if w not in SPECIAL]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
        padding_side="right",
    )
