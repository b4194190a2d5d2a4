"""Getting a model to users: the export and its parity check, the model card and Hub upload, the demo."""
