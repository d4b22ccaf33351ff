"""Chat: the conversation template, conversations as training data, and what a chat run is scored on."""
