// mvlt patch: declarations only; see rendezvous/store.h for why.
#pragma once
#include "gloo/context.h"
