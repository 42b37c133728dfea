"""One module per tab of the Gradio app; ``common`` holds what they share."""
