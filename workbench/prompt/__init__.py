"""The one prompt path: templates (data_templates/) -> ChatML ids for training, chat, eval and serving."""

from workbench.prompt.chatml import (
    Query,
    RenderedTurn,
    Sample,
    decode_tokens,
    encode_query,
    get_stop_words_ids,
    make_context,
    official_preprocess,
    tokenize,
)
from workbench.prompt.list_format import from_list_format, to_list_format
from workbench.prompt.template import (
    ChatTemplate,
    TaskTemplate,
    default_system,
    load_task_template,
    load_template,
)

__all__ = ["ChatTemplate", "Query", "RenderedTurn", "Sample", "TaskTemplate", "decode_tokens", "default_system",
           "encode_query", "from_list_format", "get_stop_words_ids", "load_task_template", "load_template",
           "make_context", "official_preprocess", "to_list_format", "tokenize"]
