"""The digits classifier as a torch-fidelity feature extractor, for FID / KID / PRC / IS on 8×8 digits.

FID on digits is the Fréchet distance in the classifier's 64-d penultimate features
(core.digits_classifier); it is not comparable to ImageNet FID, which uses Inception-v3.

    import torch_fidelity
    from core.fid_extractor import UInt8ImageDataset, metric_kwargs
    torch_fidelity.calculate_metrics(input1=UInt8ImageDataset(samples), input2=UInt8ImageDataset(real),
                                     fid=True, kid=True, prc=True, isc=True, **metric_kwargs(len(samples)))
"""
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert

from core.digits_classifier import WEIGHTS_PATH, load_digits_classifier

DIGITS_EXTRACTOR = "digits-cnn"
PENULTIMATE = "penultimate"  # (N, 64) features after the last ReLU: FID, KID, precision / recall
LOGITS = "logits"  # (N, 10) class logits: the Inception Score
INPUT_SIZE = 8


class FeatureExtractorDigits(FeatureExtractorBase):
    """Penultimate features and logits of the digits classifier, from uint8 RGB images (N, 3, H, W)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None,
                 feature_extractor_internal_dtype=None, **kwargs):
        super().__init__(name, features_list)
        vassert(feature_extractor_internal_dtype in ("float32", None),
                "The digits feature extractor only supports float32 as its internal dtype")
        self.model = load_digits_classifier(feature_extractor_weights_path or WEIGHTS_PATH)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        x = x.float().mean(dim=1, keepdim=True)  # (N, 1, H, W): the digits are grey, RGB copies of one channel
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            # Area averaging: scikit-learn made the 8×8 digits by counting 4×4 blocks of 32×32
            # bitmaps, so a ×k enlargement of a digit averages back to exactly the digit.
            x = F.adaptive_avg_pool2d(x, INPUT_SIZE)  # (N, 1, 8, 8)
        x = x / 127.5 - 1.0  # [0, 255] -> [-1, 1], the classifier's training range
        features, logits = self.model.forward_features(x)  # (N, 64), (N, 10)
        out = {PENULTIMATE: features, LOGITS: logits}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return (PENULTIMATE, LOGITS)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": LOGITS, "fid": PENULTIMATE, "kid": PENULTIMATE, "prc": PENULTIMATE}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)


def register():
    """Register DIGITS_EXTRACTOR with torch-fidelity; a second call is a no-op."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    registered = FEATURE_EXTRACTORS_REGISTRY.get(DIGITS_EXTRACTOR)
    if registered is FeatureExtractorDigits:
        return
    if registered is not None:
        raise ValueError(f"torch-fidelity feature extractor {DIGITS_EXTRACTOR!r} is already registered as {registered}")
    register_feature_extractor(DIGITS_EXTRACTOR, FeatureExtractorDigits)


def metric_kwargs(num_samples, cuda=False):
    """calculate_metrics keyword arguments for the digits extractor, sized for num_samples per input."""
    register()
    return {
        "feature_extractor": DIGITS_EXTRACTOR,
        "feature_layer_fid": PENULTIMATE,
        "feature_layer_kid": PENULTIMATE,
        "feature_layer_prc": PENULTIMATE,
        "feature_layer_isc": LOGITS,
        "kid_subset_size": min(1000, max(2, num_samples // 2)),  # the default 1000 exceeds small sample counts
        "prc_neighborhood": min(3, num_samples - 1),  # k-th nearest neighbour radius needs k < N
        "isc_splits": min(10, num_samples),
        "batch_size": 500,
        "save_cpu_ram": True,  # no DataLoader worker processes: the images are already in memory
        "cache": False,  # in-memory inputs have no stable name to cache features under
        "cuda": cuda,
        "verbose": False,
    }


class UInt8ImageDataset(Dataset):
    """Images in [-1, 1] (N, C, H, W) as the uint8 RGB tensors (3, H, W) torch-fidelity expects."""

    def __init__(self, images):
        images = torch.as_tensor(images).detach().cpu().float()
        vassert(images.dim() == 4 and images.shape[1] in (1, 3), f"Expecting images (N, 1 or 3, H, W): {images.shape}")
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W) in [0, 255]
        self.images = images.expand(-1, 3, -1, -1).contiguous()  # (N, 3, H, W): grey repeated as RGB

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]  # (3, H, W) uint8
