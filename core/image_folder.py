"""torchvision's ImageFolder on a listing already made, in a module of its own: torchvision is imported with it."""
from torchvision.datasets import ImageFolder


class ScannedImageFolder(ImageFolder):
    """ImageFolder on core.data.scan_image_folder's (classes, samples), not a second listing of its own: ImageNet's
    1.28M files listed once less on every rank at a trial's start (and, where that scan is stricter, the same files)."""

    def __init__(self, root, scan, **kwargs):
        self._scan = scan  # before ImageFolder's __init__, which asks for it
        super().__init__(root, **kwargs)

    def find_classes(self, directory):
        classes, _ = self._scan
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return self._scan[1]
