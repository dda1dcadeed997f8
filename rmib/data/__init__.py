"""Dataset readers, fundus preprocessing, synthetic fundus data and tf.data pipelines."""

from rmib.data.records import Dataset, Record

__all__ = ["Dataset", "Record"]
