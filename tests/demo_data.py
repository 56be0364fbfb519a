"""The generated data sets of the quickstart and the tests: shapes in ImageFolder layout, and a
small PASCAL VOC folder. Not a paper stage; real photos go through the stages the same way.

  python tests/demo_data.py demo_data                  # train/ and val/: 10 shape classes at 64 px
  python tests/demo_data.py --voc demo_voc             # VOCdevkit/VOC2007 (trainval, test) + VOC2012
"""
import argparse
import colorsys
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")

SHAPES = ("circle", "ring", "square", "diamond", "triangle", "star", "cross", "frame", "half_disc", "bars")


def make_demo_dataset(root, num_classes=10, train_per_class=40, val_per_class=50, image_size=64, seed=0):
    """Write a deterministic image set with real class structure to root/{train,val}/<class>/*.png.

    The class is the shape kind (circle, ring, square, ...); with more classes than shapes it is
    shape x hue family. Colour is random within a class (any hue unless a family fixes a range),
    and size, position, rotation, background gradient, noise and small distractor blobs vary per
    image, so colour alone does not tell the classes apart.
    """
    families = math.ceil(num_classes / len(SHAPES))
    names = [f"{c:03d}_{SHAPES[c % len(SHAPES)]}" + (f"_hue{c // len(SHAPES)}" if families > 1 else "")
             for c in range(num_classes)]
    for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for c, name in enumerate(names):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_id, c, i])
                image = shape_image(rng, SHAPES[c % len(SHAPES)], c // len(SHAPES), families, image_size)
                image.save(os.path.join(folder, f"{i:05d}.png"))
    return root


def shape_image(rng, shape, family, families, size):
    big = 2 * size  # drawn at twice the size, then downsampled (anti-aliasing)

    def hsv(h, s, v):
        return tuple(int(255 * x) for x in colorsys.hsv_to_rgb(h % 1.0, s, v))

    # background: a gradient between two muted colours, plus pixel noise
    a = np.array(hsv(rng.random(), rng.uniform(0, 0.4), rng.uniform(0.2, 0.9)), float)
    b = np.array(hsv(rng.random(), rng.uniform(0, 0.4), rng.uniform(0.2, 0.9)), float)
    t = np.linspace(0, 1, big)[None, :, None]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * t + np.sin(angle) * t.transpose(1, 0, 2)) / 2 + 0.5
    background = a * (1 - ramp) + b * ramp + rng.normal(0, 10, (big, big, 3))
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 4)):  # distractor blobs
        x, y, r = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(0.02, 0.06) * big
        draw.ellipse((x - r, y - r, x + r, y + r), fill=hsv(rng.random(), rng.random(), rng.random()))

    # the shape, as a mask, in a colour from the class's hue family
    r = rng.uniform(0.22, 0.4) * big
    cx, cy = rng.uniform(r + 2, big - r - 2, size=2)
    rot = np.deg2rad(rng.uniform(-25, 25))
    mask = Image.new("L", (big, big), 0)
    m = ImageDraw.Draw(mask)

    def poly(radii, angles):
        angles = np.asarray(angles) + rot
        return [(cx + q * np.cos(p), cy + q * np.sin(p)) for q, p in zip(radii, angles)]

    def box(q):
        return (cx - q, cy - q, cx + q, cy + q)

    square = np.deg2rad([45, 135, 225, 315])
    if shape == "circle":
        m.ellipse(box(r), fill=255)
    elif shape == "ring":
        m.ellipse(box(r), fill=255)
        m.ellipse(box(0.6 * r), fill=0)
    elif shape == "square":
        m.polygon(poly([r] * 4, square), fill=255)
    elif shape == "diamond":
        m.polygon(poly([r] * 4, square - np.pi / 4), fill=255)
    elif shape == "triangle":
        m.polygon(poly([r] * 3, np.deg2rad([-90, 30, 150])), fill=255)
    elif shape == "star":
        m.polygon(poly([r, 0.45 * r] * 5, np.deg2rad(np.arange(10) * 36 - 90)), fill=255)
    elif shape == "cross":
        w = 0.3 * r  # a plus sign: the 12 corners as (radius, angle) pairs
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
                   (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        m.polygon(poly([math.hypot(x, y) for x, y in corners], [math.atan2(y, x) for x, y in corners]), fill=255)
    elif shape == "frame":
        m.polygon(poly([r] * 4, square), fill=255)
        m.polygon(poly([0.6 * r] * 4, square), fill=0)
    elif shape == "half_disc":
        start = np.rad2deg(rot)
        m.pieslice(box(r), start, start + 180, fill=255)
    elif shape == "bars":
        for offset in (-0.55 * r, 0.55 * r):
            corners = [(-r, offset - 0.25 * r), (r, offset - 0.25 * r), (r, offset + 0.25 * r), (-r, offset + 0.25 * r)]
            m.polygon(poly([math.hypot(x, y) for x, y in corners], [math.atan2(y, x) for x, y in corners]), fill=255)
    hue = (family + rng.random()) / families
    colour = Image.new("RGB", (big, big), hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)))
    canvas.paste(colour, (0, 0), mask)
    return canvas.resize((size, size), Image.BILINEAR)


def make_demo_voc(root, train07=60, test07=30, train12=40, image_size=96, num_classes=4, seed=0):
    """A deterministic VOC-format folder: VOCdevkit/VOC2007 (trainval, test) and VOC2012 (trainval),
    each with JPEGImages/*.jpg, Annotations/*.xml and ImageSets/Main/<split>.txt. Every image holds
    1-3 objects: tiles drawn by shape_image (a shape on its own background), pasted onto a
    noisy gradient; the box is the tile, the class is the shape, labelled with the VOC class of the
    same index (shape 0 -> aeroplane, ...) so the files are valid VOC. Objects under 20 px are
    marked difficult."""
    splits = [("2007", "trainval", train07), ("2007", "test", test07), ("2012", "trainval", train12)]
    for split_id, (year, split, count) in enumerate(splits):
        base = os.path.join(root, "VOCdevkit", f"VOC{year}")
        for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        ids = []
        for n in range(count):
            rng = np.random.default_rng([seed, split_id, n])
            image_id = f"{year}_{split_id}{n:05d}"
            canvas = np.linspace(rng.uniform(40, 200, 3), rng.uniform(40, 200, 3), image_size)[None, :, :]
            canvas = canvas + rng.normal(0, 12, (image_size, image_size, 3))
            image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
            root_el = ET.Element("annotation")
            ET.SubElement(root_el, "filename").text = image_id + ".jpg"
            size = ET.SubElement(root_el, "size")
            for tag, v in (("width", image_size), ("height", image_size), ("depth", 3)):
                ET.SubElement(size, tag).text = str(v)
            placed = []
            for _ in range(rng.integers(1, 4)):
                c = int(rng.integers(num_classes))
                side = int(rng.integers(image_size // 6, image_size // 2))
                x0, y0 = (int(v) for v in rng.integers(0, image_size - side, 2))
                if any(x0 < x + w and x < x0 + side and y0 < y + w and y < y0 + side for x, y, w in placed):
                    continue  # objects do not overlap, so every box shows its whole tile
                placed.append((x0, y0, side))
                tile = shape_image(rng, SHAPES[c % len(SHAPES)], 0, 1, side)
                image.paste(tile, (x0, y0))
                obj = ET.SubElement(root_el, "object")
                ET.SubElement(obj, "name").text = VOC_CLASSES[c]
                ET.SubElement(obj, "difficult").text = "1" if side < 20 else "0"
                box = ET.SubElement(obj, "bndbox")
                for tag, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x0 + side), ("ymax", y0 + side)):
                    ET.SubElement(box, tag).text = str(v)
            image.save(os.path.join(base, "JPEGImages", image_id + ".jpg"), quality=95)
            ET.ElementTree(root_el).write(os.path.join(base, "Annotations", image_id + ".xml"))
            ids.append(image_id)
        with open(os.path.join(base, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return root



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write the data set")
    parser.add_argument("--voc", action="store_true", help="a VOC-format detection folder instead of shapes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.voc:
        make_demo_voc(args.folder, seed=args.seed)
        print(f"wrote a generated VOC folder to {args.folder} (VOCdevkit/VOC2007 trainval + test, VOC2012 trainval)")
    else:
        make_demo_dataset(args.folder, seed=args.seed)
        print(f"wrote demo data to {args.folder} (train/ and val/, 10 classes, 64 px)")


if __name__ == "__main__":
    main()
