"""YAML attribute catalogs, one per lesion type, installed as package data."""
