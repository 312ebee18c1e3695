import torch
import torch.nn.functional as F

from prunebench.data import Augment, TensorData


def reference(x, fill, padding, flip, seed):
    """Per-sample crop and flip, written the slow obvious way, with the same random draws."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    out = []
    for i in range(n):
        img = x[i] - fill.view(c, 1, 1)
        img = F.pad(img, (padding,) * 4) + fill.view(c, 1, 1)
        img = img[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(img.flip(2) if flip and flips[i] else img)
    return torch.stack(out)


def test_batched_crop_and_flip_equal_the_per_sample_reference():
    x = torch.randn(16, 3, 8, 8)
    fill = torch.tensor([-1.0, 0.5, 2.0])
    got = Augment(padding=2, flip=True)(x, fill, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, reference(x, fill, 2, True, 7))


def test_no_padding_is_flip_or_identity():
    x = torch.randn(32, 1, 5, 5)
    got = Augment(padding=0, flip=True)(x, torch.zeros(1), torch.Generator().manual_seed(0))
    for a, b in zip(got, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))
    assert not torch.equal(got, x)


def test_augmented_batches_keep_shapes_and_labels_aligned():
    labels = torch.arange(40) % 10
    # each image holds its own label everywhere, so a misaligned label would show
    x = labels.float().view(-1, 1, 1, 1).expand(40, 3, 12, 12).clone()
    data = TensorData("t", x, labels, x[:4], labels[:4], 10, pixel_zero=torch.full((3,), -1.0),
                      augment=Augment(padding=4))
    seen = 0
    for xb, yb in data.train_batches(16, torch.Generator().manual_seed(0)):
        assert xb.shape[1:] == (3, 12, 12)
        for img, y in zip(xb, yb):
            values = set(img.unique().tolist()) - {-1.0}
            assert values == {float(y)}
        seen += len(yb)
    assert seen == 40
