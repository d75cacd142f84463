"""What upcycle knows about architectures: one frozen record per model_type.

``record(model_type)`` gives the `Arch` record (`upcycle.arch.spec`) from the table in
`upcycle.arch.records`; `families` and `targets` hold views of it by role.
"""

from upcycle.arch.records import RECORDS, record
from upcycle.arch.spec import Arch

__all__ = ["RECORDS", "Arch", "record"]
