"""Talk to a chat-tuned run: `python chat.py [--checkpoint RUN] [--system TEXT] [--prompt TEXT]`.

The chat feature lives in `gpt/chat/` (this command: `gpt/chat/talk.py`; its template, data and scoring
beside it); this script is where a user finds it.
"""

import sys

from gpt.chat.talk import main

if __name__ == "__main__":
    sys.exit(main())
