"""``python -m controller.demo`` (what ``make demo`` runs): the story in
``controller.demo.story``, its exit code as the process's."""

import sys

from controller.demo.story import main

sys.exit(main())
