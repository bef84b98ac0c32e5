/* temporary until the commands land */
#include "cli.h"
#include <stdio.h>
