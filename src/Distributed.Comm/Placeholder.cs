namespace Distributed.Comm;
