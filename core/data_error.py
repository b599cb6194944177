"""The error a data file that cannot be used raises, from the main process or a DataLoader worker alike."""


class DataError(ValueError):
    """A data file that cannot be used (an image, a latent shard); the message names the file."""

    def __str__(self):
        # A DataLoader worker's error reaches the main process as this class built from "Caught <class> in
        # DataLoader worker process N.\nOriginal Traceback ...": its last line holds the message the worker raised.
        text = super().__str__()
        marker = f"{type(self).__name__}: "
        if text.startswith(f"Caught {type(self).__name__} ") and marker in text:
            return text.rsplit(marker, 1)[1].strip()
        return text
