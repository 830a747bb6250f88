namespace Distributed.Cluster;
