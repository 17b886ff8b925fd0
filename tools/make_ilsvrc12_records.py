"""Write a small ILSVRC-12-format TFRecord set of random JPEGs (PocketFlow's layout) for tests and benchmarks.

Usage: python tools/make_ilsvrc12_records.py --output_dir DIR [--nb_train 64] [--nb_eval 32] [--nb_files 2]
       [--min_size 20] [--max_size 48] [--bboxes] [--corrupt_train 0] [--corrupt_eval 0] [--seed 0]

Files: DIR/train-00000-of-0000N ... and DIR/validation-00000-of-0000N, each record a tf.train.Example with
image/encoded (a JPEG of random height and width in [min_size, max_size]), image/format, image/height,
image/width, image/class/label (1..1000, 0 being PocketFlow's background class) and, with --bboxes, one or two
image/object/bbox/{xmin,ymin,xmax,ymax} boxes in [0, 1]. --corrupt_* replace that many JPEGs (spread over the
split) with bytes no decoder accepts: half random bytes, half a JPEG cut short. Each image is a smooth colour
gradient whose hue depends on its label, plus noise, so a model can learn something from it.
"""
import argparse
import os
import sys

import numpy as np

NB_LABELS = 1000  # ILSVRC-12's classes; labels are 1..NB_LABELS


def _bytes_feature(tf, values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _int_feature(tf, values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _float_feature(tf, values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def random_image(rng, label, min_size, max_size):
    """uint8 [H, W, 3] with H, W uniform in [min_size, max_size]: a label-coloured gradient plus noise."""
    height, width = rng.integers(min_size, max_size + 1, size=2)
    colour = np.array([label % 10, (label // 10) % 10, (label // 100) % 10], np.float32) * 25.0
    ramp = np.linspace(0.0, 1.0, int(width), dtype=np.float32)[None, :, None]
    image = colour * (0.5 + 0.5 * ramp) + rng.normal(0.0, 12.0, (int(height), int(width), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def corrupt_bytes(rng, jpeg, index):
    """Bytes no JPEG decoder accepts: random bytes (even index) or the JPEG cut to a third (odd index)."""
    if index % 2 == 0:
        return rng.integers(0, 256, size=max(16, len(jpeg) // 2), dtype=np.uint8).tobytes()
    return jpeg[:max(8, len(jpeg) // 3)]


def make_example(tf, jpeg, label, height, width, boxes):
    """A tf.train.Example in the ILSVRC-12 layout (boxes: list of (ymin, xmin, ymax, xmax) or empty)."""
    feature = {
        "image/encoded": _bytes_feature(tf, [jpeg]),
        "image/format": _bytes_feature(tf, [b"JPEG"]),
        "image/height": _int_feature(tf, [height]),
        "image/width": _int_feature(tf, [width]),
        "image/class/label": _int_feature(tf, [label]),
    }
    if boxes:
        for key, column in (("ymin", 0), ("xmin", 1), ("ymax", 2), ("xmax", 3)):
            feature["image/object/bbox/" + key] = _float_feature(tf, [box[column] for box in boxes])
    return tf.train.Example(features=tf.train.Features(feature=feature))


def random_boxes(rng):
    """One or two boxes (ymin, xmin, ymax, xmax) covering at least a tenth of the image each."""
    boxes = []
    for _ in range(int(rng.integers(1, 3))):
        low = rng.uniform(0.0, 0.5, size=2)
        high = low + rng.uniform(0.35, 0.5, size=2)
        boxes.append((float(low[0]), float(low[1]), float(min(high[0], 1.0)), float(min(high[1], 1.0))))
    return boxes


def write_split(tf, output_dir, prefix, count, nb_files, min_size, max_size, bboxes, nb_corrupt, rng,
                labels=None):
    """Write `count` examples of one split over nb_files files; returns {path: [labels in order]}.

    Args:
      labels: optional labels to use (1..1000); random when None.
    Returns:
      {file path: list of (label, corrupt) for its records, in file order}.
    """
    corrupt = set(np.linspace(0, count - 1, nb_corrupt).round().astype(int).tolist()) if nb_corrupt else set()
    written = {}
    per_file = [len(part) for part in np.array_split(np.arange(count), nb_files)]
    index = 0
    for file_index, size in enumerate(per_file):
        path = os.path.join(output_dir, "%s-%05d-of-%05d" % (prefix, file_index, nb_files))
        records = []
        with tf.io.TFRecordWriter(path) as writer:
            for _ in range(size):
                label = int(labels[index]) if labels is not None else int(rng.integers(1, NB_LABELS + 1))
                image = random_image(rng, label, min_size, max_size)
                jpeg = tf.io.encode_jpeg(image, quality=90).numpy()
                bad = index in corrupt
                if bad:
                    jpeg = corrupt_bytes(rng, jpeg, len([i for i in corrupt if i < index]))
                boxes = random_boxes(rng) if bboxes else []
                example = make_example(tf, jpeg, label, image.shape[0], image.shape[1], boxes)
                writer.write(example.SerializeToString())
                records.append((label, bad))
                index += 1
        written[path] = records
    return written


def make_records(output_dir, nb_train=64, nb_eval=32, nb_files=2, min_size=20, max_size=48, bboxes=False,
                 corrupt_train=0, corrupt_eval=0, seed=0, nb_labels=None):
    """Write a train and a validation split in output_dir; returns {'train': ..., 'validation': ...} as write_split.

    nb_labels: draw labels from 1..nb_labels only (a learnable few classes), default all 1000.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  (the argument check needs none)

    for name, value, low in (("nb_train", nb_train, 1), ("nb_eval", nb_eval, 1), ("nb_files", nb_files, 1),
                             ("min_size", min_size, 8), ("corrupt_train", corrupt_train, 0),
                             ("corrupt_eval", corrupt_eval, 0)):
        if value < low:
            raise ValueError("--%s=%s is not valid; expected an integer >= %d" % (name, value, low))
    if max_size < min_size:
        raise ValueError("--max_size=%d is below --min_size=%d; expected max_size >= min_size" % (max_size, min_size))
    if corrupt_train > nb_train or corrupt_eval > nb_eval:
        raise ValueError("more corrupt images than images; expected --corrupt_train <= --nb_train and "
                         "--corrupt_eval <= --nb_eval")
    nb_labels = NB_LABELS if nb_labels is None else int(nb_labels)
    if not 1 <= nb_labels <= NB_LABELS:
        raise ValueError("--nb_labels=%s is not valid; expected 1..%d" % (nb_labels, NB_LABELS))
    os.makedirs(output_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    result = {}
    for prefix, count, corrupt in (("train", nb_train, corrupt_train), ("validation", nb_eval, corrupt_eval)):
        labels = rng.integers(1, nb_labels + 1, size=count)
        result[prefix] = write_split(tf, output_dir, prefix, count, min(nb_files, count), min_size, max_size,
                                     bboxes, corrupt, rng, labels)
    return result


def main(argv=None):
    """Command line entry; one `error:` line and status 2 for bad arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--nb_train", type=int, default=64)
    parser.add_argument("--nb_eval", type=int, default=32)
    parser.add_argument("--nb_files", type=int, default=2, help="files per split")
    parser.add_argument("--min_size", type=int, default=20, help="smallest image side")
    parser.add_argument("--max_size", type=int, default=48, help="largest image side")
    parser.add_argument("--nb_labels", type=int, default=None, help="labels 1..N only (default 1000)")
    parser.add_argument("--bboxes", action="store_true", help="write image/object/bbox/* boxes")
    parser.add_argument("--corrupt_train", type=int, default=0, help="corrupt JPEGs in the train split")
    parser.add_argument("--corrupt_eval", type=int, default=0, help="corrupt JPEGs in the validation split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        result = make_records(args.output_dir, args.nb_train, args.nb_eval, args.nb_files, args.min_size,
                              args.max_size, args.bboxes, args.corrupt_train, args.corrupt_eval, args.seed,
                              args.nb_labels)
    except (ValueError, OSError) as exc:
        sys.stderr.write("error: %s\n" % exc)
        return 2
    for split, files in result.items():
        print("%s: %d records in %d files" % (split, sum(len(v) for v in files.values()), len(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
