"""Files in and out: atomic, verified label writing; checks that refuse bad outputs and untrustworthy inputs early.

* Writers never leave a partial file under the final name: they write a hidden temporary beside it and rename it
  when it is complete (:mod:`.atomic`); a failure of the file system is one line that says what to do
  (:mod:`.output_errors`).
* A label file counts as written only after it was read back: geometry, every voxel, and for compressed files
  the whole stream (:mod:`.label_writing`). An output path is checked before any work (:mod:`.output_checks`).
* Input headers are read before any voxel: images larger than the memory budget (:mod:`.image_header`),
  truncated NIfTI and Analyze files and damaged compressed data (:mod:`.completeness`) are refused before the
  voxels are allocated.
* C++ libraries (ITK, niftilib, MetaIO) print to file descriptor 2; their text is collected and put into the
  error message instead, so a failing command prints exactly one ``error:`` line (:mod:`.native_stderr`).
* JSON documents, line logs several processes append to, and checksums of whole files: :mod:`.records`.

The names below are the package's interface; a module's own helpers are imported from that module.
"""
from .atomic import REPLACE_RETRY_SECONDS, STALE_TEMP_SECONDS, TEMP_MARKER, atomic_output, in_use_on_windows, \
    is_our_temporary, open_fd, remove_empty_folders, remove_stale_temporaries, replace_file, temporary_beside, \
    write_text_atomically
from .completeness import check_complete, check_data_files, checked_complete, short_data_refusal
from .image_header import ImageHeader, check_memory_budget, memory_budget, read_header, run_bytes
from .label_writing import write_label_atomically
from .native_stderr import itk_reason, native_stderr_captured
from .output_checks import LABEL_EXTENSIONS, NIFTI_EXTENSIONS, SHEAR_TOLERANCE, check_format_keeps_geometry, \
    check_output_path, is_sheared, label_extension, utf8_path
from .output_errors import library_write_error, output_error, write_failed
from .records import APPEND_WAIT_SECONDS, WINDOWS_LOCK_OFFSET, append_lines, complete_lines, parse_json, sha256_file

__all__ = ["REPLACE_RETRY_SECONDS", "STALE_TEMP_SECONDS", "TEMP_MARKER", "atomic_output", "in_use_on_windows",
           "is_our_temporary", "open_fd", "remove_empty_folders", "remove_stale_temporaries", "replace_file",
           "temporary_beside", "write_text_atomically", "check_complete", "check_data_files", "checked_complete",
           "short_data_refusal",
           "ImageHeader", "check_memory_budget", "memory_budget", "read_header", "run_bytes",
           "write_label_atomically", "itk_reason", "native_stderr_captured", "LABEL_EXTENSIONS", "NIFTI_EXTENSIONS",
           "SHEAR_TOLERANCE", "check_format_keeps_geometry", "check_output_path", "is_sheared", "label_extension",
           "utf8_path", "library_write_error", "output_error", "write_failed", "APPEND_WAIT_SECONDS",
           "WINDOWS_LOCK_OFFSET", "append_lines", "complete_lines", "parse_json", "sha256_file"]
