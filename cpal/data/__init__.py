"""Datasets in VOC layout: the reader every stage shares and the sources that write it."""
