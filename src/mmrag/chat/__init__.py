"""The assistant: chat over a memory with the frozen LM (FROMAGe retrieval, GILL images)."""

from mmrag.chat.assistant import Chat, load_chat
from mmrag.models.fromage.conversation import (
    ChatOptions,
    ImagePart,
    Message,
    Reply,
    as_messages,
)

__all__ = ["Chat", "ChatOptions", "ImagePart", "Message", "Reply", "as_messages", "load_chat"]
