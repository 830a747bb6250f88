namespace Distributed.Core;
