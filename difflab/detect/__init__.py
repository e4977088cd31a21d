"""difflab.detect: detecting generated images, online as new generators appear, down to the inpainted pixels.

    from difflab.detect import train_detector, update_detector, score_images, run_stream
    train_detector(["reals"], ["fakes"], "run")          # metrics.json: ap, acc, acc_best, per_fake
    update_detector("run", ["new-generator"])            # continue with replay of the run's earlier folders
    score_images("run", ["img.png"])                     # [{"file", "p_fake", "fake"}]
    run_stream("stream.json", "stream-run")              # ap_matrix.json / .png
    make_inpainted("shapes", "reals", "inpainted")       # pixel-level data: masks + inpainted images
    train_pixel_detector(["inpainted"], "pix-run")       # metrics.json: pixel_ap, iou
    localize("pix-run", "img.png", "overlay.png")
"""
from difflab.detect.data import AugmentConfig
from difflab.detect.image import DetectConfig, evaluate, score_images, train_detector, update_detector
from difflab.detect.model import Detector, PixelDetector, load_detector
from difflab.detect.pixel import PixelConfig, localize, make_inpainted, train_pixel_detector
from difflab.detect.stream import make_generator, run_stream

__all__ = ["AugmentConfig", "DetectConfig", "Detector", "PixelDetector", "load_detector", "train_detector",
           "update_detector", "score_images", "evaluate", "run_stream", "make_generator", "PixelConfig",
           "make_inpainted", "train_pixel_detector", "localize"]
