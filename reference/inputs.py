"""Deterministic synthetic input images for the float reference and the fidelity tooling.

We have no dataset offline, and white noise is a poor stand-in for a photograph: it has no spatial
correlation, so neighbouring patches look unrelated, attention has nothing to latch on to and routing
statistics are unlike those of a real frame. :func:`synthetic_images` instead builds images from the
ingredients of a street or indoor scene, as seen after the usual ImageNet normalisation:

* a smooth background with a ``1/f**1.4`` amplitude spectrum (natural images sit near ``1/f``; a
  little steeper keeps the texture from dominating the shapes), shared by the three channels through a
  random colour mix plus weak smooth chroma fields, so RGB stays strongly correlated as in photographs;
* a few piecewise-constant regions with sharp straight edges (half-planes and rectangles: road, walls,
  vehicles), which give segmentation-like boundaries;
* a few soft Gaussian blobs (lights, objects);
* a little pixel noise (sensor noise), far below the signal.

Each image is then normalised per channel to zero mean and unit variance and given a small random
per-channel offset and gain, so the statistics are *roughly* (not exactly) zero-mean unit-variance, like
a normalised photograph. Finally it is turned into what a camera delivers, **uint8 pixels**
(:func:`synthetic_pixels`: ``p = clip(round(255 (mean_c + std_c x)), 0, 255)`` with the ImageNet
``IMAGENET_MEAN``/``IMAGENET_STD`` the M³ViT training code normalises with), and
:func:`synthetic_images` returns those pixels normalised again (:func:`normalize_pixels`), so every
float image is on the 1/255 grid of a real photograph, with the clipping of real over- and
under-exposed pixels.

The result depends only on ``(cfg.img_size, cfg.in_chans, batch, seed)``: the generator is a private
``torch.Generator`` and the global RNG is neither read nor advanced. Use distinct seeds for calibration
and evaluation sets.
"""

import math
import os

import numpy as np
import torch

from m3vit_hw.model_config import ModelConfig

__all__ = ["synthetic_images", "synthetic_pixels", "normalize_pixels", "load_image", "image_files", "IMAGE_SUFFIXES", "IMAGENET_MEAN", "IMAGENET_STD"]

#: Per-channel (RGB) normalisation of the M³ViT training code (torchvision's ImageNet statistics):
#: ``x = (p / 255 - mean) / std`` for uint8 pixels ``p``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _spectral_field(gen, height, width, alpha=1.0):
    """Gaussian random field with amplitude spectrum ``1/f**alpha``, zero mean, unit variance."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64).reshape(-1, 1)
    fx = torch.fft.rfftfreq(width, dtype=torch.float64).reshape(1, -1)
    freq = torch.sqrt(fx * fx + fy * fy)
    # The DC term would be infinite; the field is re-centred below anyway.
    freq[0, 0] = 1.0
    amplitude = freq.pow(-alpha)
    amplitude[0, 0] = 0.0
    re = torch.randn(freq.shape, generator=gen, dtype=torch.float64)
    im = torch.randn(freq.shape, generator=gen, dtype=torch.float64)
    field = torch.fft.irfft2(torch.complex(re, im) * amplitude, s=(height, width))
    field = field - field.mean()
    return field / field.std().clamp_min(1e-12)


def _uniform(gen, lo, hi, size=()):
    return lo + (hi - lo) * torch.rand(size, generator=gen, dtype=torch.float64)


def _one_image(gen, channels, height, width):
    yy = torch.arange(height, dtype=torch.float64).reshape(-1, 1) / height
    xx = torch.arange(width, dtype=torch.float64).reshape(1, -1) / width

    # Background: one luminance field plus weaker chroma fields, mixed into channels.
    lum = _spectral_field(gen, height, width, alpha=1.4)
    image = lum.expand(channels, height, width) * _uniform(gen, 0.6, 1.0, (channels, 1, 1))
    for c in range(channels):
        image[c] += 0.15 * _spectral_field(gen, height, width, alpha=2.0)

    # Large flat regions with straight edges (horizon, road border, facades).
    for _ in range(int(torch.randint(2, 5, (), generator=gen))):
        theta = float(_uniform(gen, 0.0, math.pi))
        offset = float(_uniform(gen, -0.3, 0.3))
        side = (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta) > offset
        colour = torch.randn(channels, 1, 1, generator=gen, dtype=torch.float64) * 0.8
        image = image + side.unsqueeze(0) * colour

    # Axis-aligned boxes (vehicles, windows, signs).
    for _ in range(int(torch.randint(3, 9, (), generator=gen))):
        y0, x0 = float(_uniform(gen, 0.0, 0.9)), float(_uniform(gen, 0.0, 0.9))
        h, w = float(_uniform(gen, 0.05, 0.4)), float(_uniform(gen, 0.05, 0.4))
        inside = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        colour = torch.randn(channels, 1, 1, generator=gen, dtype=torch.float64)
        image = torch.where(inside.unsqueeze(0), image * 0.3 + colour, image)

    # Soft blobs (lights, round objects).
    for _ in range(int(torch.randint(2, 6, (), generator=gen))):
        cy, cx = float(_uniform(gen, 0.0, 1.0)), float(_uniform(gen, 0.0, 1.0))
        radius = float(_uniform(gen, 0.03, 0.2))
        blob = torch.exp(-((yy - cy) ** 2 + ((xx - cx) * width / height) ** 2) / (2 * radius ** 2))
        image = image + blob.unsqueeze(0) * torch.randn(channels, 1, 1, generator=gen, dtype=torch.float64)

    image = image + 0.02 * torch.randn(image.shape, generator=gen, dtype=torch.float64)

    mean = image.mean(dim=(1, 2), keepdim=True)
    std = image.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    image = (image - mean) / std
    # Normalised photographs are only roughly standardised: the dataset mean/std are not the image's.
    gain = _uniform(gen, 0.8, 1.2, (channels, 1, 1))
    shift = 0.2 * torch.randn(channels, 1, 1, generator=gen, dtype=torch.float64)
    return image * gain + shift


def _channel_stats(channels, dtype=torch.float64):
    if channels != len(IMAGENET_MEAN):
        # Non-RGB inputs (none of the presets): a neutral normalisation keeps the pixel mapping defined.
        return (torch.full((channels, 1, 1), 0.5, dtype=dtype), torch.full((channels, 1, 1), 0.25, dtype=dtype))
    return (torch.tensor(IMAGENET_MEAN, dtype=dtype).reshape(-1, 1, 1),
            torch.tensor(IMAGENET_STD, dtype=dtype).reshape(-1, 1, 1))


def normalize_pixels(pixels, dtype=torch.float32):
    """uint8 pixels ``[..., C, H, W]`` -> the normalised float image the float model takes.

    ``x = (p / 255 - mean_c) / std_c`` with ``IMAGENET_MEAN``/``IMAGENET_STD`` (neutral 0.5/0.25 for a
    channel count other than 3). Accepts a torch tensor or a numpy array of integers in [0, 255].
    """
    p = torch.as_tensor(pixels)
    if p.is_floating_point() or p.dim() < 3:
        raise TypeError(f"pixels must be an integer tensor [..., C, H, W], not {p.dtype} of shape {list(p.shape)}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) > 255):
        raise ValueError(f"pixels must be in [0, 255], got [{int(p.min())}, {int(p.max())}]")
    mean, std = _channel_stats(p.shape[-3])
    return ((p.to(torch.float64) / 255.0 - mean) / std).to(dtype)


def synthetic_pixels(cfg, batch, seed):
    """Deterministic natural-looking uint8 images ``[batch, C, H, W]`` (see the module docstring)."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, not {type(cfg).__name__}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer, not {batch!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, not {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    height, width = cfg.img_size
    mean, std = _channel_stats(cfg.in_chans)
    images = []
    for _ in range(batch):
        x = _one_image(gen, cfg.in_chans, height, width)
        images.append(torch.clamp(torch.round(255.0 * (mean + std * x)), 0, 255).to(torch.uint8))
    return torch.stack(images)


def synthetic_images(cfg, batch, seed, dtype=torch.float32):
    """Deterministic natural-looking normalised images for ``cfg``.

    Parameters
    ----------
    cfg : ModelConfig
        Supplies ``img_size`` and ``in_chans``.
    batch : int
        Number of images, >= 1.
    seed : int
        Seed of a private generator; the same ``(cfg, batch, seed)`` always gives the same tensor, and
        image ``b`` of a batch does not depend on ``batch`` (images are drawn one after another).
    dtype : torch.dtype
        Output dtype (the images are built in float64 and cast once).

    Returns
    -------
    torch.Tensor
        ``[batch, cfg.in_chans, H, W]``, each channel roughly zero-mean and unit-variance, every value
        ``normalize_pixels`` of a uint8 pixel (the 1/255 grid of a real photograph).
    """
    return normalize_pixels(synthetic_pixels(cfg, batch, seed), dtype)


#: File types :func:`load_image` reads.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


def _fit(img, height, width):
    """Resize (bilinear, aspect ratio kept) so ``img`` covers ``height x width``, then centre-crop."""
    from PIL import Image
    h, w = img.height, img.width
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BILINEAR)
    top, left = (nh - height) // 2, (nw - width) // 2
    return img.crop((left, top, left + width, top + height))


def load_image(path, cfg):
    """A real image as the encoder's uint8 pixels ``[3, H, W]`` (torch.uint8) for preset ``cfg``.

    PNG/JPEG go through Pillow (converted to RGB); ``.npy`` must hold a uint8 ``[H, W, 3]`` array. The
    image is resized, keeping its aspect ratio, so that it covers the preset's ``img_size`` (bilinear),
    then centre-cropped to it: a 2048x1024 Cityscapes frame becomes 256x128 for W1 with nothing cropped.
    """
    from PIL import Image
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"image {path!r} does not exist or is not a file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"image {path!r}: suffix must be one of {', '.join(IMAGE_SUFFIXES)}, not {suffix!r}")
    if cfg.in_chans != 3:
        raise ValueError(f"image files need a 3-channel model, not in_chans={cfg.in_chans}")
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image {path!r}: .npy must hold uint8 [H, W, 3], not {arr.dtype} {list(arr.shape)}")
        img = Image.fromarray(arr, "RGB")
    else:
        try:
            img = Image.open(path)
            img = img.convert("RGB")
        except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, ...
            raise ValueError(f"image {path!r} cannot be read: {type(exc).__name__}: {exc}") from exc
    height, width = cfg.img_size
    arr = np.asarray(_fit(img, height, width), dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def image_files(directory):
    """The image files (``IMAGE_SUFFIXES``) of ``directory``, sorted by name; at least one."""
    directory = str(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"calibration directory {directory!r} does not exist")
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                   if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"calibration directory {directory!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return files
