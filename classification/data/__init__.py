"""Data preparation: COCO Camera Traps files, crops, classification datasets, splits."""
