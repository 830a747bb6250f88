namespace Distributed.Model;
