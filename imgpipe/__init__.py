"""imgpipe: the reusable core of the DVC image-classification pipeline."""
