"""Annotation formats, one module per tool (coco, labelme, cvat, voc), each reading and writing that tool's files;
``writer.AnnotationWriter`` writes a predict run in them, ``importer.import_annotations`` turns an export into the
folder dataset format."""

from regproxy_cli.data.formats.coco import COCO_FILE
from regproxy_cli.data.formats.importer import import_annotations
from regproxy_cli.data.formats.writer import ANNOTATION_FORMATS, AnnotationWriter, check_formats

__all__ = ["ANNOTATION_FORMATS", "COCO_FILE", "AnnotationWriter", "check_formats", "import_annotations"]
