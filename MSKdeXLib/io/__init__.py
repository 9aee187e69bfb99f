"""Reading and writing: CT volumes, label maps, segmentations, radiographs, outputs."""
